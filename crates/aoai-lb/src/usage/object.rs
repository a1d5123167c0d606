//! A direct reader for the usage object in the shape instances send it,
//! ahead of serde.
//!
//! Every non-streaming inference response has its `usage` object read, and
//! through serde's derive (field names matched as strings, unknown fields
//! skipped through `IgnoredAny`, `Option`s) that costs several times more
//! than walking the few hundred bytes once. [`read`] takes the common shape
//! only: an object of known or unknown keys without escapes, whose values
//! are unsigned integers, `null`, or (for the `*_tokens_details` fields and
//! unknown keys) flat objects of those. Anything else (a float, a negative
//! number, a string, an array, an escaped key, a repeated field, trailing
//! bytes) answers "not mine", and the caller asks serde, so the result is
//! always serde's.

use super::{RawDetails, RawUsage};

/// The usage object in `json`: `Some(None)` for `null`, `Some(Some(_))` for
/// an object of the common shape, `None` when serde must decide.
pub(super) fn read(json: &[u8]) -> Option<Option<RawUsage>> {
    let mut c = Cursor { b: json, i: 0 };
    c.ws();
    let usage = if c.literal(b"null") {
        None
    } else {
        Some(c.usage()?)
    };
    c.ws();
    (c.i == json.len()).then_some(usage)
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

/// Which fields were set, to leave a repeated one to serde (which refuses
/// it).
struct Seen(u16);

impl Seen {
    fn first(&mut self, bit: u16) -> Option<()> {
        if self.0 & bit != 0 {
            return None;
        }
        self.0 |= bit;
        Some(())
    }
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// JSON white space (serde_json's set: no form feed).
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, l: &[u8]) -> bool {
        if self.b[self.i..].starts_with(l) {
            self.i += l.len();
            true
        } else {
            false
        }
    }

    /// A key of printable ASCII without escapes (serde also checks that a
    /// key is UTF-8; this leaves every non-ASCII byte to it).
    fn key(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.i;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' | 0..=0x1f | 0x80..=0xff => return None,
                _ => self.i += 1,
            }
        }
        let k = &self.b[start..self.i];
        self.i += 1;
        self.ws();
        self.eat(b':').then_some(())?;
        self.ws();
        Some(k)
    }

    /// `null` or an unsigned integer as serde_json reads one into a `u64`
    /// (no leading zero, no fraction or exponent, no overflow).
    fn count(&mut self) -> Option<Option<u64>> {
        if self.literal(b"null") {
            return Some(None);
        }
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0 || (digits > 1 && self.b[start] == b'0') {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(Some(n))
    }

    /// Calls `member` for each key of an object, the cursor on its value;
    /// `member` reads the value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        if !self.eat(b'{') {
            return None;
        }
        self.ws();
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let k = self.key()?;
            member(self, k)?;
            self.ws();
            if self.eat(b'}') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
            self.ws();
        }
    }

    /// A value of a field nobody reads: a count, `null`, or a flat object
    /// of those.
    fn skip(&mut self) -> Option<()> {
        if self.peek() == Some(b'{') {
            return self.object(|c, _| c.count().map(drop));
        }
        self.count().map(drop)
    }

    fn details(&mut self) -> Option<Option<RawDetails>> {
        if self.literal(b"null") {
            return Some(None);
        }
        let mut d = RawDetails {
            cached_tokens: None,
            reasoning_tokens: None,
        };
        let mut seen = Seen(0);
        self.object(|c, k| {
            match k {
                b"cached_tokens" => {
                    seen.first(1)?;
                    d.cached_tokens = c.count()?;
                }
                b"reasoning_tokens" => {
                    seen.first(2)?;
                    d.reasoning_tokens = c.count()?;
                }
                _ => c.skip()?,
            }
            Some(())
        })?;
        Some(Some(d))
    }

    fn usage(&mut self) -> Option<RawUsage> {
        let mut u = RawUsage {
            prompt_tokens: None,
            completion_tokens: None,
            input_tokens: None,
            output_tokens: None,
            prompt_tokens_details: None,
            completion_tokens_details: None,
            input_tokens_details: None,
            output_tokens_details: None,
        };
        let mut seen = Seen(0);
        self.object(|c, k| {
            match k {
                b"prompt_tokens" => {
                    seen.first(1)?;
                    u.prompt_tokens = c.count()?;
                }
                b"completion_tokens" => {
                    seen.first(2)?;
                    u.completion_tokens = c.count()?;
                }
                b"input_tokens" => {
                    seen.first(4)?;
                    u.input_tokens = c.count()?;
                }
                b"output_tokens" => {
                    seen.first(8)?;
                    u.output_tokens = c.count()?;
                }
                b"prompt_tokens_details" => {
                    seen.first(16)?;
                    u.prompt_tokens_details = c.details()?;
                }
                b"completion_tokens_details" => {
                    seen.first(32)?;
                    u.completion_tokens_details = c.details()?;
                }
                b"input_tokens_details" => {
                    seen.first(64)?;
                    u.input_tokens_details = c.details()?;
                }
                b"output_tokens_details" => {
                    seen.first(128)?;
                    u.output_tokens_details = c.details()?;
                }
                _ => c.skip()?,
            }
            Some(())
        })?;
        Some(u)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Usage, parse_usage_object};
    use super::*;
    use proptest::prelude::*;

    fn by_serde(json: &[u8]) -> Option<Usage> {
        serde_json::from_slice::<Option<RawUsage>>(json)
            .ok()
            .flatten()
            .and_then(RawUsage::into_usage)
    }

    fn direct(json: &[u8]) -> Option<Option<Usage>> {
        read(json).map(|u| u.and_then(RawUsage::into_usage))
    }

    #[test]
    fn reads_the_shapes_azure_sends_without_serde() {
        for (json, want) in [
            (
                &br#"{"completion_tokens":16,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":3,"rejected_prediction_tokens":0},"prompt_tokens":12,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":4},"total_tokens":28}"#[..],
                (12, 16, 4, 3),
            ),
            (
                br#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":123}"#,
                (36, 87, 0, 20),
            ),
            (br#"{ "prompt_tokens" : 8 ,"total_tokens":8 }"#, (8, 0, 0, 0)),
            (
                br#"{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":null}"#,
                (3, 2, 0, 0),
            ),
        ] {
            let u = direct(json).expect("the common shape is read directly").unwrap();
            assert_eq!((u.prompt, u.completion, u.cached, u.reasoning), want);
            assert_eq!(by_serde(json), Some(u));
        }
        assert_eq!(direct(b"null"), Some(None));
        assert_eq!(direct(b"{}"), Some(None));
    }

    #[test]
    fn leaves_what_serde_must_judge_to_serde() {
        for json in [
            &br#"{"prompt_tokens":1.0}"#[..],
            br#"{"prompt_tokens":-1}"#,
            br#"{"prompt_tokens":01}"#,
            br#"{"prompt_tokens":18446744073709551616}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            br#"{"prompt\u005ftokens":1}"#,
            br#"{"prompt_tokens":1,}"#,
            br#"{"prompt_tokens":1} x"#,
            br#"{"x":"text"}"#,
            br#"{"x":[1]}"#,
            "{\"\u{e9}\":1}".as_bytes(),
            b"{\"x\xff\":1}",
            b"[1]",
        ] {
            assert_eq!(direct(json), None, "{}", String::from_utf8_lossy(json));
        }
    }

    const KEYS: &[&str] = &[
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens_details",
        "output_tokens_details",
        "cached_tokens",
        "reasoning_tokens",
        "total_tokens",
        "audio_tokens",
        "",
        "prompt\\u005ftokens",
        "\u{e9}",
    ];

    const VALUES: &[&str] = &[
        "0",
        "7",
        "1234",
        "00",
        "01",
        "-1",
        "-0",
        "1.5",
        "2e3",
        "null",
        "true",
        "\"s\"",
        "[]",
        "{}",
        "18446744073709551615",
        "18446744073709551616",
        "{\"cached_tokens\":3}",
        "{\"reasoning_tokens\":null,\"audio_tokens\":0}",
        "{\"cached_tokens\":4,\"cached_tokens\":5}",
        "{\"cached_tokens\":{\"x\":1}}",
        "{\"reasoning_tokens\":2.0}",
    ];

    const SPACES: &[&str] = &["", "", "", " ", "\n\t", "\r", "\u{c}"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn always_gives_serdes_answer(
            members in proptest::collection::vec(
                (
                    proptest::sample::select(KEYS),
                    proptest::sample::select(VALUES),
                    proptest::sample::select(SPACES),
                ),
                0..8,
            ),
            end in proptest::sample::select(&["}", "}", "}", ",}", "} x", "", "}}"][..]),
        ) {
            let mut json = String::from("{");
            for (i, (k, v, sp)) in members.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                json.push_str(&format!("{sp}\"{k}\"{sp}:{sp}{v}{sp}"));
            }
            json.push_str(end);
            prop_assert_eq!(parse_usage_object(json.as_bytes()), by_serde(json.as_bytes()), "{}", json);
            if let Some(d) = direct(json.as_bytes()) {
                prop_assert_eq!(d, by_serde(json.as_bytes()), "{}", json);
            }
        }
    }
}
