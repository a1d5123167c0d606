//! The usage event of a server-sent event stream, found on the fly.
//!
//! [`SseScanner`] sees the response body chunk by chunk, as the instance
//! sends it, and splits it into events (an event ends with an empty line;
//! lines end with LF, CRLF or CR, as the SSE format allows). An event can
//! be split across chunks anywhere, the line terminators included.
//!
//! - **Read mode** (the client asked for usage, or nothing can be asked):
//!   every chunk goes on unchanged, at once; the scanner only looks.
//! - **Strip mode** (the gateway added `stream_options.include_usage`): the
//!   first chat/completions usage chunk (`"choices":[]` with a `usage`
//!   object) is removed, with its terminating empty line, and nothing else:
//!   every other byte reaches the client, in order, `data: [DONE]`
//!   included. To be able to withhold that one event, an event that is not
//!   complete at the end of a chunk is held back until its last byte
//!   arrives; an SSE client cannot act on half an event anyway, so only
//!   chunk boundaries move, never bytes. Once the event is removed the rest
//!   passes through untouched.
//!
//! Cost: one pass over line terminators per chunk, one substring search
//! for `"usage"` per event and, until usage is found, a search for the
//! streamed text (kept for an estimate if the stream is cut). A chunk made
//! of whole events goes on as the same `Bytes`, without copying or
//! allocating; only an event split across chunks is copied into a reused
//! buffer.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;

use super::{Endpoint, Usage, parse_event};

/// Streamed text kept for an estimate is capped; past it, each further
/// text event counts one token.
const MAX_TEXT: usize = 1 << 20;

/// Longest event kept to be read (a Responses `response.completed` event
/// repeats the whole output). A longer one is passed on unread, so a
/// stream that never ends an event cannot grow the gateway's memory.
pub const MAX_EVENT: usize = 8 << 20;

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));

/// The keys whose string values are streamed text, by endpoint (chat:
/// `content`, `arguments`, `refusal`; completions: `text`; Responses:
/// `delta`), built once: `memmem::find` builds its searcher on every call,
/// and with three keys searched in every event that cost more than the
/// searching.
static TEXT_KEYS: LazyLock<[Finder<'static>; 5]> = LazyLock::new(|| {
    [
        Finder::new(b"\"content\""),
        Finder::new(b"\"arguments\""),
        Finder::new(b"\"refusal\""),
        Finder::new(b"\"text\""),
        Finder::new(b"\"delta\""),
    ]
});

/// The keys [`not_a_usage_chunk`] looks at, built once (see [`TEXT_KEYS`]).
static CHUNK_KEYS: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
    [
        Finder::new(b"\"choices\""),
        Finder::new(b"\"usage\""),
        Finder::new(b"\"id\""),
    ]
});

/// Finds usage in an event stream and, in strip mode, removes the usage
/// chunk the client did not ask for. See the module docs.
pub struct SseScanner {
    strip: bool,
    /// The range of [`TEXT_KEYS`] this endpoint streams text under.
    text_keys: std::ops::Range<usize>,
    /// Nothing on the current line yet.
    at_line_start: bool,
    /// The last byte seen was CR: an LF right after it belongs to the same
    /// terminator.
    after_cr: bool,
    /// The bytes of the unfinished event (a copy when they were sent
    /// already, else held back).
    carry: BytesMut,
    /// The unfinished event's bytes were sent as they came: it cannot be
    /// removed any more.
    committed: bool,
    /// The unfinished event outgrew [`MAX_EVENT`]: passed on unread.
    oversized: bool,
    usage: Option<Usage>,
    removed: bool,
    text: String,
    pieces: Vec<u32>,
    extra_pieces: u64,
}

impl SseScanner {
    /// A scanner for a stream from `endpoint`. With `strip`, the usage
    /// chunk is removed from the bytes passed on.
    pub fn new(endpoint: Endpoint, strip: bool) -> Self {
        let text_keys = match endpoint {
            Endpoint::Chat => 0..3,
            Endpoint::Completions => 3..4,
            Endpoint::Responses => 4..5,
            Endpoint::Embeddings => 0..0,
        };
        Self {
            strip,
            text_keys,
            at_line_start: true,
            after_cr: false,
            carry: BytesMut::new(),
            committed: false,
            oversized: false,
            usage: None,
            removed: false,
            text: String::new(),
            pieces: Vec::new(),
            extra_pieces: 0,
        }
    }

    /// The usage reported so far (the usage chunk or `response.completed`).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether this scanner removes the usage chunk (strip mode).
    pub fn strips(&self) -> bool {
        self.strip
    }

    /// Whether the usage chunk was removed from the stream.
    pub fn removed(&self) -> bool {
        self.removed
    }

    /// Text streamed before usage arrived, as the pieces the events carried
    /// (`text[pieces[i-1]..pieces[i]]`), and the count of further text
    /// events past the cap.
    pub fn streamed(&self) -> (&str, &[u32], u64) {
        (&self.text, &self.pieces, self.extra_pieces)
    }

    /// Once the usage is known and nothing is left to remove, chunks go on
    /// untouched.
    fn passthrough(&self) -> bool {
        if self.strip {
            self.removed
        } else {
            self.usage.is_some()
        }
    }

    /// Takes the next chunk of the instance's body; returns the bytes to
    /// send to the client now (`None`: nothing yet).
    pub fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        if chunk.is_empty() {
            return None;
        }
        if self.passthrough() && self.carry.is_empty() {
            return Some(chunk);
        }
        let len = chunk.len();
        let mut out = Out::new(&chunk);
        let mut scan = 0usize;
        let mut seg_start = 0usize;
        while let Some(end) = self.next_boundary(&chunk, &mut scan) {
            if self.oversized && seg_start == 0 {
                // The end of an event too long to look at: sent as it came.
                self.oversized = false;
                out.range(0, end);
            } else if !self.carry.is_empty() && seg_start == 0 {
                // The event the carry began ends here.
                self.carry.extend_from_slice(&chunk[..end]);
                let committed = std::mem::take(&mut self.committed);
                let remove = self.inspect_carry(!committed);
                if committed {
                    out.range(0, end);
                } else if !remove {
                    out.owned(self.carry.split().freeze());
                }
                self.carry.clear();
            } else if !self.inspect(&chunk[seg_start..end], true) {
                out.range(seg_start, end);
            }
            seg_start = end;
            if self.passthrough() && !self.after_cr {
                // Nothing more to look at: the rest goes on as it is.
                out.range(seg_start, len);
                self.at_line_start = true;
                return out.build();
            }
        }
        if seg_start < len && self.oversized {
            out.range(seg_start, len);
        } else if seg_start < len && self.carry.len() + (len - seg_start) > MAX_EVENT {
            // Too long to be a usage chunk or to keep: sent on, not read.
            if !self.committed {
                out.owned(self.carry.split().freeze());
            }
            self.carry = BytesMut::new();
            self.committed = false;
            self.oversized = true;
            out.range(seg_start, len);
        } else if seg_start < len {
            // The start or the middle of an event that ends later.
            let before = self.carry.len();
            self.carry.extend_from_slice(&chunk[seg_start..]);
            if self.committed {
                out.range(seg_start, len);
            } else if !self.strip || not_a_usage_chunk(&self.carry) {
                // Its bytes can go now: it is not the one to remove.
                self.committed = true;
                if before > 0 {
                    out.owned(Bytes::copy_from_slice(&self.carry[..before]));
                }
                out.range(seg_start, len);
            }
        }
        out.build()
    }

    /// The instance's body ended cleanly: settles a pending CR and returns
    /// the bytes still held (an event without its final empty line is
    /// passed on as it came).
    pub fn finish(&mut self) -> Option<Bytes> {
        self.oversized = false;
        let complete = std::mem::take(&mut self.after_cr) && self.terminate();
        let committed = std::mem::take(&mut self.committed);
        let mut held = None;
        if !self.carry.is_empty() {
            // Only a complete event may be removed; an unterminated one is
            // looked at for usage and passed on as it came.
            let remove = self.inspect_carry(complete && !committed);
            if !remove && !committed {
                held = Some(self.carry.split().freeze());
            }
        }
        self.carry.clear();
        held
    }

    /// Advances the line state over `c` from `*scan`; returns the end
    /// (exclusive) of the next event, or `None` when `c` is used up.
    fn next_boundary(&mut self, c: &[u8], scan: &mut usize) -> Option<usize> {
        let mut i = *scan;
        loop {
            if self.after_cr {
                if i >= c.len() {
                    *scan = i;
                    return None;
                }
                self.after_cr = false;
                if c[i] == b'\n' {
                    i += 1;
                }
                if self.terminate() {
                    *scan = i;
                    return Some(i);
                }
                continue;
            }
            let Some(k) = memchr::memchr2(b'\n', b'\r', &c[i..]) else {
                if i < c.len() {
                    self.at_line_start = false;
                }
                *scan = c.len();
                return None;
            };
            if k > 0 {
                self.at_line_start = false;
            }
            let j = i + k;
            i = j + 1;
            if c[j] == b'\r' {
                self.after_cr = true;
                continue;
            }
            if self.terminate() {
                *scan = i;
                return Some(i);
            }
        }
    }

    /// A line ended; true when it was empty (the event ends).
    fn terminate(&mut self) -> bool {
        if self.at_line_start {
            true
        } else {
            self.at_line_start = true;
            false
        }
    }

    fn inspect_carry(&mut self, removable: bool) -> bool {
        let carry = std::mem::take(&mut self.carry);
        let remove = self.inspect(&carry, removable);
        self.carry = carry;
        remove
    }

    /// Looks at one complete event; true when it is to be removed (only
    /// when `removable`: none of its bytes were sent yet).
    fn inspect(&mut self, event: &[u8], removable: bool) -> bool {
        if self.usage.is_some() {
            return false;
        }
        if has_usage_object(event)
            && let Some(data) = event_data(event)
            && let Some(e) = parse_event(&data)
        {
            self.usage = Some(e.usage);
            // The same test that lets a partial event go early keeps it
            // here, so where the chunks were cut never changes the result.
            if self.strip
                && removable
                && e.usage_chunk
                && !self.removed
                && !not_a_usage_chunk(event)
            {
                self.removed = true;
                return true;
            }
            return false;
        }
        self.collect_text(event);
        false
    }

    fn collect_text(&mut self, event: &[u8]) {
        for key in &TEXT_KEYS[self.text_keys.clone()] {
            for at in key.find_iter(event) {
                let after = at + key.needle().len();
                let Some(value) = string_value_at(event, after) else {
                    continue;
                };
                if value.is_empty() {
                    continue;
                }
                if self.text.len() + value.len() > MAX_TEXT {
                    self.extra_pieces += 1;
                    continue;
                }
                let before = self.text.len();
                unescape_into(value, &mut self.text);
                if self.text.len() > before {
                    self.pieces
                        .push(u32::try_from(self.text.len()).unwrap_or(u32::MAX));
                }
            }
        }
    }
}

/// What one chunk sends on: ranges of the chunk and held-back bytes, in
/// order. A single range is a slice of the chunk (no copy); anything else
/// is joined into one buffer.
struct Out<'a> {
    chunk: &'a Bytes,
    /// At most three pieces occur (a held-back event completed here, the
    /// chunk's bytes before and after a removed event); more would be
    /// joined.
    pieces: [Option<Piece>; 4],
    n: usize,
}

enum Piece {
    Range(usize, usize),
    Owned(Bytes),
}

impl<'a> Out<'a> {
    fn new(chunk: &'a Bytes) -> Self {
        Self {
            chunk,
            pieces: [None, None, None, None],
            n: 0,
        }
    }

    fn range(&mut self, a: usize, b: usize) {
        if a >= b {
            return;
        }
        if let Some(Some(Piece::Range(_, end))) = self.n.checked_sub(1).map(|i| &mut self.pieces[i])
            && *end == a
        {
            *end = b;
            return;
        }
        self.push(Piece::Range(a, b));
    }

    fn owned(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.push(Piece::Owned(b));
        }
    }

    fn push(&mut self, p: Piece) {
        if self.n == self.pieces.len() {
            let joined = self.join();
            self.pieces = [Some(Piece::Owned(joined)), None, None, None];
            self.n = 1;
        }
        self.pieces[self.n] = Some(p);
        self.n += 1;
    }

    fn join(&self) -> Bytes {
        let mut buf = BytesMut::new();
        for p in self.pieces.iter().take(self.n).flatten() {
            match p {
                Piece::Range(a, b) => buf.extend_from_slice(&self.chunk[*a..*b]),
                Piece::Owned(o) => buf.extend_from_slice(o),
            }
        }
        buf.freeze()
    }

    fn build(self) -> Option<Bytes> {
        match (&self.pieces[0], self.n) {
            (_, 0) => None,
            (Some(Piece::Range(a, b)), 1) => Some(if *a == 0 && *b == self.chunk.len() {
                self.chunk.clone()
            } else {
                self.chunk.slice(*a..*b)
            }),
            (Some(Piece::Owned(o)), 1) => Some(o.clone()),
            _ => Some(self.join()),
        }
    }
}

/// True when the start of an event already shows it is not a usage chunk:
/// its data is not a JSON object (`[DONE]`), `choices` is not empty,
/// `usage` is `null`, or `id` is empty (Azure's prompt-annotation event; a
/// usage chunk carries the completion's id). Such an event's bytes go on
/// before it is complete.
fn not_a_usage_chunk(partial: &[u8]) -> bool {
    let data = partial
        .split(|&b| b == b'\n' || b == b'\r')
        .find_map(|l| l.strip_prefix(b"data:"))
        .map(<[u8]>::trim_ascii_start);
    if data.is_some_and(|d| d.first().is_some_and(|&c| c != b'{')) {
        return true;
    }
    let after = |finder: &Finder<'static>| {
        let key = finder.needle();
        finder.find_iter(partial).any(|at| {
            let rest = partial[at + key.len()..].trim_ascii_start();
            let Some(rest) = rest.strip_prefix(b":") else {
                return false;
            };
            let rest = rest.trim_ascii_start();
            if key == b"\"usage\"" {
                return rest.first() == Some(&b'n');
            }
            if key == b"\"id\"" {
                return rest.starts_with(b"\"\"");
            }
            let Some(rest) = rest.strip_prefix(b"[") else {
                return false;
            };
            rest.trim_ascii_start().first().is_some_and(|&c| c != b']')
        })
    };
    let [choices, usage, id] = &*CHUNK_KEYS;
    after(choices) || after(usage) || after(id)
}

/// Whether `"usage"` is followed (after optional whitespace and a colon)
/// by an object anywhere in the event. `"usage":null` chunks are skipped
/// without parsing.
fn has_usage_object(event: &[u8]) -> bool {
    USAGE_KEY.find_iter(event).any(|at| {
        let rest = &event[at + 7..];
        let rest = rest.trim_ascii_start();
        rest.first() == Some(&b':') && rest[1..].trim_ascii_start().first() == Some(&b'{')
    })
}

/// The event's data: its `data:` lines' values (one leading space
/// removed), joined with LF. A single data line is borrowed.
fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut found: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        let Some(v) = line.strip_prefix(b"data:") else {
            continue;
        };
        let v = v.strip_prefix(b" ").unwrap_or(v);
        found = Some(match found {
            None => Cow::Borrowed(v),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(v);
                Cow::Owned(joined)
            }
        });
    }
    found
}

/// The raw contents of the JSON string that follows `: ` at `at`, if the
/// value is a string (escapes not yet decoded).
fn string_value_at(s: &[u8], at: usize) -> Option<&[u8]> {
    let rest = s.get(at..)?.trim_ascii_start();
    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
    let body = rest.strip_prefix(b"\"")?;
    let mut i = 0;
    while let Some(k) = memchr::memchr2(b'"', b'\\', &body[i..]) {
        let j = i + k;
        if body[j] == b'"' {
            return Some(&body[..j]);
        }
        i = j + 2;
        if i > body.len() {
            return None;
        }
    }
    None
}

/// Decodes JSON string escapes (`\n`, `\"`, `\uXXXX` with surrogate pairs,
/// ...) into `out`. Invalid escapes and bytes are skipped: the text only
/// feeds a token estimate.
fn unescape_into(raw: &[u8], out: &mut String) {
    if !raw.contains(&b'\\') {
        out.push_str(&String::from_utf8_lossy(raw));
        return;
    }
    let mut bytes: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            bytes.push(b);
            i += 1;
            continue;
        }
        let Some(&e) = raw.get(i + 1) else { break };
        i += 2;
        let simple = match e {
            b'n' => Some(b'\n'),
            b't' => Some(b'\t'),
            b'r' => Some(b'\r'),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'"' | b'\\' | b'/' => Some(e),
            _ => None,
        };
        if let Some(c) = simple {
            bytes.push(c);
            continue;
        }
        if e != b'u' {
            continue;
        }
        let Some(hi) = hex4(raw.get(i..i + 4)) else {
            continue;
        };
        i += 4;
        let code = if (0xd800..0xdc00).contains(&hi)
            && raw.get(i..i + 2) == Some(b"\\u")
            && let Some(lo) = hex4(raw.get(i + 2..i + 6))
            && (0xdc00..0xe000).contains(&lo)
        {
            i += 6;
            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
        } else {
            hi
        };
        if let Some(c) = char::from_u32(code) {
            let mut buf = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    out.push_str(&String::from_utf8_lossy(&bytes));
}

fn hex4(b: Option<&[u8]>) -> Option<u32> {
    let b = b?;
    let s = std::str::from_utf8(b).ok()?;
    u32::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FIRST: &str = "data: {\"id\":\"\",\"object\":\"\",\"created\":0,\"model\":\"\",\"prompt_filter_results\":[],\"choices\":[],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"completion_tokens\":3,\"completion_tokens_details\":{\"reasoning_tokens\":1},\"prompt_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":2},\"total_tokens\":12}}\n\n";

    fn delta(text: &str) -> String {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{}}},\"finish_reason\":null}}],\"usage\":null}}\n\n",
            serde_json::to_string(text).unwrap()
        )
    }

    fn stream(with_usage: bool) -> String {
        let mut s = String::from(FIRST);
        s.push_str(&delta("Hello"));
        s.push_str(&delta(" wor\"ld\u{e9}\u{1f600}"));
        s.push_str("data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n");
        if with_usage {
            s.push_str(USAGE);
        }
        s.push_str("data: [DONE]\n\n");
        s
    }

    fn run(scanner: &mut SseScanner, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            if let Some(b) = scanner.push(Bytes::copy_from_slice(c)) {
                out.extend_from_slice(&b);
            }
        }
        if let Some(b) = scanner.finish() {
            out.extend_from_slice(&b);
        }
        out
    }

    fn split_at(s: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (s.len() + 1)).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut prev = 0;
        for c in cuts {
            out.push(s[prev..c].to_vec());
            prev = c;
        }
        out.push(s[prev..].to_vec());
        out
    }

    #[test]
    fn strip_mode_removes_exactly_the_usage_chunk() {
        let mut s = SseScanner::new(Endpoint::Chat, true);
        let out = run(&mut s, &[stream(true).as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), stream(false));
        assert!(s.removed());
        let u = s.usage().unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.cached, u.reasoning),
            (9, 3, 2, 1)
        );
    }

    #[test]
    fn read_mode_changes_nothing_and_reads_the_usage() {
        let mut s = SseScanner::new(Endpoint::Chat, false);
        let out = run(&mut s, &[stream(true).as_bytes()]);
        assert_eq!(String::from_utf8(out).unwrap(), stream(true));
        assert!(!s.removed());
        assert_eq!(s.usage().unwrap().prompt, 9);
    }

    #[test]
    fn whole_event_chunks_pass_as_the_same_buffer() {
        let mut s = SseScanner::new(Endpoint::Chat, true);
        let c = Bytes::from(delta("x"));
        let out = s.push(c.clone()).unwrap();
        assert_eq!(out.as_ptr(), c.as_ptr());
        assert_eq!(out.len(), c.len());
    }

    #[test]
    fn a_split_usage_chunk_is_still_removed_and_done_kept() {
        let full = stream(true);
        let at = full.find("\"usage\":{").unwrap();
        let parts: [&[u8]; 3] = [
            &full.as_bytes()[..at + 3],
            &full.as_bytes()[at + 3..full.len() - 3],
            &full.as_bytes()[full.len() - 3..],
        ];
        let mut s = SseScanner::new(Endpoint::Chat, true);
        assert_eq!(
            String::from_utf8(run(&mut s, &parts)).unwrap(),
            stream(false)
        );
    }

    #[test]
    fn crlf_and_cr_line_ends_are_events_too() {
        for nl in ["\r\n", "\r"] {
            let full = stream(true).replace('\n', nl);
            let expect = stream(false).replace('\n', nl);
            for cut in 0..full.len() {
                let mut s = SseScanner::new(Endpoint::Chat, true);
                let out = run(&mut s, &[&full.as_bytes()[..cut], &full.as_bytes()[cut..]]);
                assert_eq!(String::from_utf8(out).unwrap(), expect, "cut at {cut}");
            }
        }
    }

    #[test]
    fn the_client_requested_usage_chunk_is_kept() {
        let mut s = SseScanner::new(Endpoint::Chat, false);
        let full = stream(true);
        let out = run(
            &mut s,
            &split_at(full.as_bytes(), &[10, 200, 400])
                .iter()
                .map(Vec::as_slice)
                .collect::<Vec<_>>(),
        );
        assert_eq!(String::from_utf8(out).unwrap(), full);
    }

    #[test]
    fn keeps_the_streamed_text_for_an_estimate() {
        let mut s = SseScanner::new(Endpoint::Chat, false);
        run(&mut s, &[stream(false).as_bytes()]);
        let (text, pieces, extra) = s.streamed();
        assert_eq!(text, "Hello wor\"ld\u{e9}\u{1f600}");
        assert_eq!(pieces, &[5, text.len() as u32]);
        assert_eq!(extra, 0);
        assert_eq!(s.usage(), None);
    }

    #[test]
    fn reads_responses_completed_usage() {
        let s_text = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n\
            event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi there\"}\n\n\
            event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"output\":[{\"content\":[{\"text\":\"Hi there\"}]}],\"usage\":{\"input_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":13}}}\n\n";
        let mut s = SseScanner::new(Endpoint::Responses, false);
        let out = run(
            &mut s,
            &[&s_text.as_bytes()[..100], &s_text.as_bytes()[100..]],
        );
        assert_eq!(out, s_text.as_bytes());
        let u = s.usage().unwrap();
        assert_eq!((u.prompt, u.completion), (11, 2));
        assert_eq!(s.streamed().0, "Hi there");
    }

    #[test]
    fn an_unterminated_tail_is_passed_on() {
        let mut s = SseScanner::new(Endpoint::Chat, true);
        let out = run(&mut s, &[b"data: {\"choices\":[]}\n\ndata: [DO", b"NE]"]);
        assert_eq!(out, b"data: {\"choices\":[]}\n\ndata: [DONE]");
    }

    #[test]
    fn strip_mode_sends_a_partial_content_event_at_once_and_holds_a_partial_usage_chunk() {
        let mut s = SseScanner::new(Endpoint::Chat, true);
        let ev = delta("Hello");
        let cut = ev.find("Hel").unwrap();
        let out = s
            .push(Bytes::copy_from_slice(&ev.as_bytes()[..cut]))
            .unwrap();
        assert_eq!(
            &out[..],
            &ev.as_bytes()[..cut],
            "non-empty choices: not the usage chunk"
        );
        let out = s
            .push(Bytes::copy_from_slice(&ev.as_bytes()[cut..]))
            .unwrap();
        assert_eq!(&out[..], &ev.as_bytes()[cut..]);

        let cut = USAGE.find("\"usage\"").unwrap() + 3;
        assert_eq!(
            s.push(Bytes::copy_from_slice(&USAGE.as_bytes()[..cut])),
            None
        );
        assert_eq!(
            s.push(Bytes::copy_from_slice(&USAGE.as_bytes()[cut..])),
            None
        );
        assert!(s.removed());
        let done = s.push(Bytes::from_static(b"data: [DO")).unwrap();
        assert_eq!(&done[..], b"data: [DO");
    }

    #[test]
    fn an_oversized_event_is_passed_on_unread() {
        let mut s = SseScanner::new(Endpoint::Chat, true);
        let big = vec![b'x'; MAX_EVENT];
        let mut out = Vec::new();
        out.extend_from_slice(
            &s.push(Bytes::from_static(b"data: {\"id\":\"c\","))
                .unwrap_or_default(),
        );
        out.extend_from_slice(&s.push(Bytes::from(big.clone())).unwrap());
        out.extend_from_slice(&s.push(Bytes::from_static(b"}\n\n")).unwrap());
        out.extend_from_slice(&s.push(Bytes::from(USAGE)).unwrap_or_default());
        out.extend_from_slice(&s.push(Bytes::from_static(b"data: [DONE]\n\n")).unwrap());
        let mut want = b"data: {\"id\":\"c\",".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"}\n\ndata: [DONE]\n\n");
        assert_eq!(out.len(), want.len());
        assert!(out == want, "only the usage chunk is removed");
        assert!(s.carry.capacity() < MAX_EVENT, "nothing that size was kept");
    }

    #[test]
    fn unescapes_json_strings() {
        let mut out = String::new();
        unescape_into(br#"a\n\"b\\\u00e9\ud83d\ude00\/"#, &mut out);
        assert_eq!(out, "a\n\"b\\\u{e9}\u{1f600}/");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_chunk_split_gives_the_same_bytes(
            cuts in proptest::collection::vec(0usize..4096, 0..12),
            strip in any::<bool>(),
            crlf in any::<bool>(),
            texts in proptest::collection::vec("[ -~\u{e9}\u{4e2d}\n]{0,12}", 0..6),
        ) {
            let mut full = String::from(FIRST);
            let mut plain = String::from(FIRST);
            for t in &texts {
                full.push_str(&delta(t));
                plain.push_str(&delta(t));
            }
            full.push_str(USAGE);
            full.push_str("data: [DONE]\n\n");
            plain.push_str("data: [DONE]\n\n");
            if crlf {
                full = full.replace('\n', "\r\n");
                plain = plain.replace("\n", "\r\n");
            }
            let chunks = split_at(full.as_bytes(), &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let mut s = SseScanner::new(Endpoint::Chat, strip);
            let out = run(&mut s, &refs);
            let expect = if strip { &plain } else { &full };
            prop_assert_eq!(String::from_utf8(out).unwrap(), expect.clone());
            prop_assert_eq!(s.usage().map(|u| u.prompt), Some(9));
            prop_assert_eq!(s.removed(), strip);
        }

        #[test]
        fn arbitrary_bytes_never_lose_or_add_bytes_in_read_mode(
            data in proptest::collection::vec(any::<u8>(), 0..512),
            cuts in proptest::collection::vec(0usize..512, 0..8),
        ) {
            let chunks = split_at(&data, &cuts);
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let mut s = SseScanner::new(Endpoint::Chat, false);
            prop_assert_eq!(run(&mut s, &refs), data.clone());
            let mut s = SseScanner::new(Endpoint::Chat, true);
            // Strip mode removes at most one event, and only a usage chunk.
            let out = run(&mut s, &refs);
            if !s.removed() {
                prop_assert_eq!(out, data);
            }
        }
    }
}
