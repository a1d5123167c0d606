//! HTTP/1 request framing for the relay: the request head and the chunked
//! body decoder, with the request-smuggling rules of RFC 9112 enforced.
//!
//! Pure functions over byte buffers (no I/O), so they can be fuzzed
//! against `httparse` directly. The head is tokenised by `httparse`; this
//! module adds what `httparse` leaves to its caller and what hyper does
//! not check either:
//! - bare CR or bare LF anywhere in the head (`httparse` takes a lone LF as
//!   a line end) is refused, so no peer can read the head differently;
//! - obs-fold (a field line starting with whitespace) is refused (`httparse`
//!   already fails it as an invalid header name);
//! - `Transfer-Encoding` together with `Content-Length`, more than one
//!   `Content-Length` (even with equal values), a length that is not plain
//!   decimal digits, a transfer coding list that does not end in `chunked`
//!   or names `chunked` twice, and `Transfer-Encoding` on HTTP/1.0 are all
//!   refused with 400 and the connection is closed (RFC 9112 §6.1, §6.3);
//!   a coding other than `chunked` is 501 (the gateway does not decode
//!   them, and forwarding the bytes without the coding would change the
//!   body's meaning);
//! - more than one `Host` is refused, and so is an HTTP/1.1 request
//!   without one (RFC 9112 §3.2; HTTP/1.0 requests may omit it).
//!
//! Header values stay slices of the head buffer (no copy); header names
//! outside the standard set are allocated, as hyper does.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version, header};

/// Header lines parsed on the stack; a larger `server.max_headers` moves
/// the scratch array to the heap.
const STACK_HEADERS: usize = 128;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length`, no `Transfer-Encoding`, or a length of 0).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`, decoded by [`ChunkDecoder`].
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// The request method.
    pub method: Method,
    /// The request target as sent (origin form in practice).
    pub uri: Uri,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Every header line, values sharing the head buffer.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// The client wants the connection kept open after this exchange
    /// (HTTP/1.1 without `Connection: close`, or HTTP/1.0 with
    /// `Connection: keep-alive`).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on HTTP/1.1.
    pub expect_continue: bool,
    /// An `Upgrade` header is present: the exchange is not the relay's
    /// (a WebSocket handshake goes to hyper).
    pub upgrade: bool,
}

/// Why a request head was refused. Each maps to a status the client is
/// told before the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP/1.x syntax (request line, field line, bad byte).
    #[error("the request head is malformed: {0}")]
    Malformed(&'static str),
    /// The head does not fit the buffer cap.
    #[error("the request head is larger than the server accepts")]
    TooLarge,
    /// More header lines than `server.max_headers`.
    #[error("the request has more header lines than the server accepts")]
    TooManyHeaders,
    /// Framing that two parsers could read differently (RFC 9112 §6).
    #[error("the request's message framing is ambiguous: {0}")]
    Framing(&'static str),
    /// A transfer coding other than `chunked`.
    #[error("the request uses a transfer coding the server does not implement")]
    UnsupportedCoding,
}

impl HeadError {
    /// The status the client is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::Malformed(_) | HeadError::Framing(_) => 400,
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UnsupportedCoding => 501,
        }
    }
}

/// Looks for a complete request head at the start of `buf`. `Ok(None)`: not
/// complete yet (read more, unless `buf` has reached the size cap). On
/// success the head's bytes are split off `buf`, which then starts with the
/// body or the next request.
///
/// # Errors
/// [`HeadError`] for a head that must be refused; the caller answers with
/// [`HeadError::status`] and closes the connection.
pub fn parse_head(buf: &mut BytesMut, max_headers: usize) -> Result<Option<Head>, HeadError> {
    // The offsets of what httparse found, so the borrow of `buf` ends
    // before the head is split off and frozen. httparse's scratch slots
    // start uninitialised: zeroing 128 of them for every request cost more
    // than parsing the head.
    let scanned = {
        let bytes: &[u8] = buf;
        if max_headers <= STACK_HEADERS {
            let mut scratch = [const { MaybeUninit::uninit() }; STACK_HEADERS];
            scan(bytes, &mut scratch[..max_headers])?
        } else {
            let mut scratch = Vec::with_capacity(max_headers);
            scratch.resize_with(max_headers, MaybeUninit::uninit);
            scan(bytes, &mut scratch)?
        }
    };
    let Some(s) = scanned else { return Ok(None) };
    let head = buf.split_to(s.len).freeze();
    build(head, s.method, s.version, s.target, &s.lines).map(Some)
}

/// Byte offsets of one header line within the head.
#[derive(Clone, Copy)]
struct Line {
    name: (usize, usize),
    value: (usize, usize),
}

/// What [`scan`] found in a complete head.
struct Scanned {
    len: usize,
    lines: Vec<Line>,
    method: Method,
    version: Version,
    target: (usize, usize),
}

fn offset_of(base: &[u8], part: &[u8]) -> (usize, usize) {
    let start = (part.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    (start, start + part.len())
}

fn scan<'b>(
    bytes: &'b [u8],
    scratch: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Scanned>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(bytes, scratch) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // A bare CR or LF is refused as soon as it is seen, not only
            // once the head is complete.
            check_line_ends(bytes)?;
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed("unsupported HTTP version"));
        }
        Err(httparse::Error::HeaderName) => {
            return Err(HeadError::Malformed("invalid header name or folded line"));
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HeadError::Malformed("invalid header value"));
        }
        Err(httparse::Error::NewLine) => return Err(HeadError::Malformed("invalid line end")),
        Err(_) => return Err(HeadError::Malformed("invalid request line")),
    };
    check_line_ends(&bytes[..len])?;
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = offset_of(bytes, req.path.unwrap_or("").as_bytes());
    let lines = req
        .headers
        .iter()
        .map(|h| Line {
            name: offset_of(bytes, h.name.as_bytes()),
            value: offset_of(bytes, h.value),
        })
        .collect();
    Ok(Some(Scanned {
        len,
        lines,
        method,
        version,
        target,
    }))
}

/// A CR must be followed by LF and an LF preceded by CR (RFC 9112 §2.2:
/// a lone CR or LF is where two parsers disagree on where a line ends).
fn check_line_ends(bytes: &[u8]) -> Result<(), HeadError> {
    for i in memchr::memchr2_iter(b'\r', b'\n', bytes) {
        let ok = if bytes[i] == b'\r' {
            // A CR at the very end of an incomplete buffer may still get
            // its LF.
            bytes.get(i + 1).is_none_or(|&b| b == b'\n')
        } else {
            i > 0 && bytes[i - 1] == b'\r'
        };
        if !ok {
            return Err(HeadError::Malformed("bare CR or LF in the head"));
        }
    }
    Ok(())
}

fn build(
    head: Bytes,
    method: Method,
    version: Version,
    target: (usize, usize),
    lines: &[Line],
) -> Result<Head, HeadError> {
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    let mut headers = HeaderMap::with_capacity(lines.len());
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut has_te = false;
    let mut hosts = 0usize;
    let mut close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    let mut upgrade = false;
    for l in lines {
        let name = HeaderName::from_bytes(&head[l.name.0..l.name.1])
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let raw = &head[l.value.0..l.value.1];
        if name == header::CONTENT_LENGTH {
            if content_length.is_some() {
                return Err(HeadError::Framing("more than one Content-Length"));
            }
            content_length = Some(parse_length(raw)?);
        } else if name == header::TRANSFER_ENCODING {
            has_te = true;
            chunked = transfer_coding(raw, chunked)?;
        } else if name == header::HOST {
            hosts += 1;
            if hosts > 1 {
                return Err(HeadError::Framing("more than one Host"));
            }
        } else if name == header::CONNECTION {
            for token in raw.split(|&b| b == b',') {
                let t = trim(token);
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue |= trim(raw).eq_ignore_ascii_case(b"100-continue");
        } else if name == header::UPGRADE {
            upgrade = true;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(l.value.0..l.value.1))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    let framing = if has_te {
        if version == Version::HTTP_10 {
            return Err(HeadError::Framing("Transfer-Encoding on HTTP/1.0"));
        }
        if content_length.is_some() {
            return Err(HeadError::Framing(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        if !chunked {
            return Err(HeadError::Framing(
                "Transfer-Encoding does not end in chunked",
            ));
        }
        Framing::Chunked
    } else {
        match content_length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    // RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request
    // without Host. Checked after the framing so that a head with both
    // faults reports the framing one; either way it is a 400 and the
    // connection closes.
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(HeadError::Malformed("HTTP/1.1 request without Host"));
    }
    let keep_alive = if version == Version::HTTP_11 {
        !close
    } else {
        keep_alive && !close
    };
    Ok(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11,
        upgrade,
    })
}

fn parse_length(raw: &[u8]) -> Result<u64, HeadError> {
    content_length(raw).ok_or(HeadError::Framing("invalid Content-Length"))
}

/// A `Content-Length` value: 1 to 19 decimal digits, nothing else (no
/// sign, no list, no space inside: `httparse` has already trimmed the
/// ends). Requests and the instances' responses are held to the same rule.
pub fn content_length(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 19 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(raw.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Folds one `Transfer-Encoding` line into the state "the list so far ends
/// in chunked". Codings after `chunked`, `chunked` twice or empty list
/// elements are framing errors; a coding other than `chunked` is 501.
fn transfer_coding(raw: &[u8], mut ends_chunked: bool) -> Result<bool, HeadError> {
    for token in raw.split(|&b| b == b',') {
        let t = trim(token);
        if t.is_empty() {
            return Err(HeadError::Framing("empty transfer coding"));
        }
        if ends_chunked {
            return Err(HeadError::Framing("a transfer coding after chunked"));
        }
        if t.eq_ignore_ascii_case(b"chunked") {
            ends_chunked = true;
        } else if t.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::UnsupportedCoding);
        } else {
            return Err(HeadError::Framing("invalid transfer coding"));
        }
    }
    Ok(ends_chunked)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// RFC 9110 `tchar`.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Most bytes of chunk extensions on one size line, and of the trailer
/// section, before the body is refused.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked framing: {0}")]
pub struct ChunkError(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of the size; `digits` counts them.
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeWs,
    /// After `;`, before the extension name.
    ExtStart,
    /// Inside the extensions, up to CR.
    Ext,
    /// CR seen at the end of the size line.
    SizeLf,
    /// `remaining` data bytes to come.
    Data,
    /// CR after the data.
    DataCr,
    /// LF after the data.
    DataLf,
    /// Start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// CR at the end of a trailer line.
    TrailerLf,
    /// CR of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// What one [`ChunkDecoder::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Body bytes (a slice of the input).
    Data(&'a [u8]),
    /// All input consumed; more is needed.
    More,
    /// The body ended (last chunk and trailers consumed).
    Done,
}

/// An incremental decoder of a chunked body (RFC 9112 §7.1), strict about
/// what it accepts: hex sizes of at most 16 digits, extensions of visible
/// characters starting with a token, CRLF after every chunk and line, and
/// well-formed trailer fields (which are dropped).
#[derive(Debug, Clone)]
pub struct ChunkDecoder {
    state: State,
    size: u64,
    digits: u8,
    line: usize,
    trailers: usize,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
            trailers: 0,
        }
    }

    /// True once the last chunk and the trailers have been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `input` up to the next data bytes, which it
    /// returns, or up to the end of the input or of the body. Returns how
    /// many bytes of `input` were consumed (data included).
    ///
    /// # Errors
    /// [`ChunkError`] when the framing is invalid; the body must then be
    /// refused and the connection closed.
    pub fn step<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Step<'a>), ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                return Ok((i + n, Step::Data(&input[i..i + n])));
            }
            let b = input[i];
            i += 1;
            self.state = self.byte(b)?;
            if self.state == State::Done {
                return Ok((i, Step::Done));
            }
        }
        Ok((
            i,
            if self.is_done() {
                Step::Done
            } else {
                Step::More
            },
        ))
    }

    fn byte(&mut self, b: u8) -> Result<State, ChunkError> {
        Ok(match self.state {
            State::Size => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if self.digits == 16 {
                        return Err(ChunkError("chunk size over 16 hex digits"));
                    }
                    self.digits += 1;
                    let d = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        _ => b - b'A' + 10,
                    };
                    self.size = (self.size << 4) | u64::from(d);
                    State::Size
                }
                _ if self.digits == 0 => return Err(ChunkError("missing chunk size")),
                b' ' | b'\t' => State::SizeWs,
                b';' => self.ext_begin(),
                b'\r' => State::SizeLf,
                _ => return Err(ChunkError("invalid byte after chunk size")),
            },
            State::SizeWs => match b {
                b' ' | b'\t' => State::SizeWs,
                b';' => self.ext_begin(),
                b'\r' => State::SizeLf,
                _ => return Err(ChunkError("invalid byte after chunk size")),
            },
            State::ExtStart => match b {
                b' ' | b'\t' => self.ext_byte(State::ExtStart)?,
                _ if is_tchar(b) => self.ext_byte(State::Ext)?,
                _ => return Err(ChunkError("chunk extension without a name")),
            },
            State::Ext => match b {
                b'\r' => State::SizeLf,
                b'\t' | b' '..=b'~' | 0x80..=0xff => self.ext_byte(State::Ext)?,
                _ => return Err(ChunkError("invalid byte in chunk extension")),
            },
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError("chunk size line not ended by CRLF"));
                }
                if self.size == 0 {
                    self.line = 0;
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            State::Data => return Err(ChunkError("internal: data state")),
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(ChunkError("chunk data not followed by CRLF")),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.digits = 0;
                    State::Size
                }
                _ => return Err(ChunkError("chunk data not followed by CRLF")),
            },
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                _ if is_tchar(b) => self.trailer_byte(State::Trailer)?,
                _ => return Err(ChunkError("invalid trailer field")),
            },
            State::Trailer => match b {
                b'\r' => {
                    if self.line == 0 {
                        return Err(ChunkError("trailer field without a colon"));
                    }
                    State::TrailerLf
                }
                b':' if self.line == 0 => {
                    self.line = 1;
                    self.trailer_byte(State::Trailer)?
                }
                _ if self.line == 0 && is_tchar(b) => self.trailer_byte(State::Trailer)?,
                b'\t' | b' '..=b'~' | 0x80..=0xff if self.line == 1 => {
                    self.trailer_byte(State::Trailer)?
                }
                _ => return Err(ChunkError("invalid byte in trailer field")),
            },
            State::TrailerLf => match b {
                b'\n' => {
                    self.line = 0;
                    State::TrailerStart
                }
                _ => return Err(ChunkError("trailer line not ended by CRLF")),
            },
            State::EndLf => match b {
                b'\n' => State::Done,
                _ => return Err(ChunkError("chunked body not ended by CRLF")),
            },
            State::Done => return Err(ChunkError("bytes after the end of the body")),
        })
    }

    fn ext_begin(&mut self) -> State {
        self.line = 0;
        State::ExtStart
    }

    fn ext_byte(&mut self, next: State) -> Result<State, ChunkError> {
        self.line += 1;
        if self.line > MAX_CHUNK_LINE {
            return Err(ChunkError("chunk extensions too long"));
        }
        Ok(next)
    }

    fn trailer_byte(&mut self, next: State) -> Result<State, ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError("trailer section too long"));
        }
        Ok(next)
    }
}

/// Decodes a complete chunked body held in `input`: the decoded bytes and
/// how many bytes of `input` the body took. `Ok(None)` when `input` ends
/// before the body does.
///
/// # Errors
/// [`ChunkError`] for invalid framing.
pub fn decode_chunked(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ChunkError> {
    let mut d = ChunkDecoder::new();
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let (n, step) = d.step(&input[at..])?;
        at += n;
        match step {
            Step::Data(b) => out.extend_from_slice(b),
            Step::Done => return Ok(Some((out, at))),
            Step::More => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, HeadError> {
        let mut b = BytesMut::from(raw.as_bytes());
        parse_head(&mut b, 100)
    }

    #[test]
    fn parses_a_post_with_length_and_leaves_the_body_in_the_buffer() {
        let mut b = BytesMut::from(
            &b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-Custom: v\r\n\r\nabc"[..],
        );
        let h = parse_head(&mut b, 100).unwrap().unwrap();
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri.path(), "/a");
        assert_eq!(h.uri.query(), Some("b=1"));
        assert_eq!(h.framing, Framing::Length(3));
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-custom"], "v");
        assert_eq!(&b[..], b"abc");
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn refuses_the_smuggling_shapes_of_rfc_9112() {
        let cases = [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n foo\r\n\r\n",
            "POST / HTTP/1.1\nHost: x\n\n",
            "POST / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ];
        for c in cases {
            let e = head(c).unwrap_err();
            assert_eq!(e.status(), 400, "{c:?}: {e:?}");
            assert!(
                !matches!(e, HeadError::Malformed(m) if m.contains("Host")),
                "{c:?} refused for its Host, not for what it tests: {e:?}"
            );
        }
        let e = head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap_err();
        assert_eq!(e, HeadError::UnsupportedCoding);
    }

    #[test]
    fn refuses_http11_without_host_and_accepts_http10_without_it() {
        for c in [
            "GET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nX-Host: x\r\n\r\n",
        ] {
            assert!(
                matches!(head(c), Err(HeadError::Malformed(_))),
                "{c:?}: {:?}",
                head(c)
            );
        }
        // A framing fault in the same head is the one reported.
        assert!(matches!(
            head("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            Err(HeadError::Framing(_))
        ));
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.version, Version::HTTP_10);
        assert!(head("GET / HTTP/1.1\r\nhOsT: x\r\n\r\n").unwrap().is_some());
    }

    #[test]
    fn refuses_too_many_headers_with_431() {
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for i in 0..5 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let mut b = BytesMut::from(raw.as_bytes());
        assert_eq!(parse_head(&mut b, 4).unwrap_err().status(), 431);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(
            head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            !head("GET / HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn decodes_chunks_split_anywhere_the_same() {
        let body =
            b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (whole, used) = decode_chunked(body).unwrap().unwrap();
        assert_eq!(&whole[..], b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(&body[used..], b"NEXT");
        for split in 0..=used {
            let mut d = ChunkDecoder::new();
            let mut out = Vec::new();
            for part in [&body[..split], &body[split..used]] {
                let mut at = 0;
                while at < part.len() {
                    let (n, s) = d.step(&part[at..]).unwrap();
                    at += n;
                    if let Step::Data(b) = s {
                        out.extend_from_slice(b);
                    }
                }
            }
            assert!(d.is_done());
            assert_eq!(out, whole);
        }
    }

    #[test]
    fn refuses_invalid_chunk_framing() {
        for bad in [
            &b"\r\n"[..],
            b"-1\r\n",
            b"1 2\r\n",
            b"x\r\n",
            b"11111111111111111\r\n",
            b"1\nA\r\n",
            b"1\r\nAB\r\n",
            b"1;\r\n",
            b"1;\x01\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\n\n",
        ] {
            assert!(decode_chunked(bad).is_err(), "{bad:?}");
        }
    }
}
