//! Differential fuzzing of the relay's HTTP/1 request framing
//! (`aoai_lb::relay::h1`) against `httparse`, the parser hyper uses.
//!
//! - Request heads: whatever the relay accepts, `httparse` must accept with
//!   the same length, method, version and header lines; whatever
//!   `httparse` refuses, the relay refuses. Where the relay is stricter
//!   (the RFC 9112 smuggling rules), the reason must really be in the
//!   input: a bare CR or LF, the framing fields it names, or a missing
//!   Host on HTTP/1.1.
//! - Chunked bodies: a body the relay's decoder accepts must decode to the
//!   same bytes and end at the same offset under a reference decoder built
//!   on `httparse::parse_chunk_size`, and the incremental decoder must give
//!   the same answer however the input is split.
#![no_main]

use aoai_lb::relay::h1::{self, ChunkDecoder, Framing, HeadError, Step};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const MAX_HEADERS: usize = 32;

fn has_bare_line_end(b: &[u8]) -> bool {
    b.iter().enumerate().any(|(i, &c)| match c {
        b'\r' => b.get(i + 1).is_some_and(|&n| n != b'\n'),
        b'\n' => i == 0 || b[i - 1] != b'\r',
        _ => false,
    })
}

fn check_head(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mine = h1::parse_head(&mut buf, MAX_HEADERS);
    let mut scratch = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut scratch);
    let theirs = req.parse(data);
    match (&mine, &theirs) {
        (Ok(Some(head)), Ok(httparse::Status::Complete(n))) => {
            let n = *n;
            assert_eq!(&buf[..], &data[n..], "the rest after the head");
            assert!(!has_bare_line_end(&data[..n]));
            assert_eq!(Some(head.method.as_str()), req.method);
            assert_eq!(
                head.version == http::Version::HTTP_10,
                req.version == Some(0)
            );
            assert_eq!(head.headers.len(), req.headers.len());
            for h in req.headers.iter() {
                assert!(
                    head.headers
                        .get_all(h.name)
                        .iter()
                        .any(|v| v.as_bytes() == h.value),
                    "header {} lost",
                    h.name
                );
            }
            let lengths: Vec<&[u8]> = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .map(|h| h.value)
                .collect();
            let te = req
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
            let hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"))
                .count();
            assert!(hosts <= 1, "two Host fields accepted");
            assert!(
                hosts == 1 || req.version == Some(0),
                "an HTTP/1.1 request without Host accepted"
            );
            assert!(lengths.len() <= 1, "duplicate Content-Length accepted");
            assert!(!(te && !lengths.is_empty()), "CL and TE accepted together");
            match head.framing {
                Framing::Chunked => assert!(te && req.version == Some(1)),
                Framing::Length(l) => {
                    assert_eq!(lengths.len(), 1);
                    assert_eq!(std::str::from_utf8(lengths[0]).unwrap().parse::<u64>().unwrap(), l);
                }
                Framing::Empty => assert!(!te),
            }
        }
        (Ok(Some(_)), other) => panic!("relay accepted a head httparse gives {other:?}"),
        (Ok(None), Ok(httparse::Status::Partial)) => {}
        (Ok(None), other) => panic!("relay wants more where httparse gives {other:?}"),
        (Err(_), Err(_)) => {}
        (Err(HeadError::TooManyHeaders), _) => panic!("too many headers only httparse can say"),
        (Err(HeadError::Malformed(_)), Ok(_)) => {
            // Stricter than httparse only for bare line ends, for a
            // method, target or value the `http` types refuse, or for an
            // HTTP/1.1 request without Host (RFC 9112 §3.2).
        }
        (Err(HeadError::Framing(_) | HeadError::UnsupportedCoding), Ok(s)) => {
            assert!(s.is_complete(), "framing judged on an incomplete head");
            assert!(req.headers.iter().any(|h| {
                ["content-length", "transfer-encoding", "host"]
                    .iter()
                    .any(|n| h.name.eq_ignore_ascii_case(n))
            }));
        }
        (Err(HeadError::TooLarge), _) => panic!("parse_head never says TooLarge"),
    }
}

/// A lenient chunked decoder on `httparse::parse_chunk_size`: sizes and
/// extensions as httparse reads them, CRLF after data, trailer lines up to
/// an empty line.
fn reference(input: &[u8]) -> Option<Result<(Vec<u8>, usize), ()>> {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        let (n, size) = match httparse::parse_chunk_size(&input[at..]) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(Err(())),
        };
        at += n;
        if size == 0 {
            loop {
                let rest = &input[at..];
                let Some(p) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return None;
                };
                at += p + 2;
                if p == 0 {
                    return Some(Ok((out, at)));
                }
            }
        }
        let size = usize::try_from(size).ok()?;
        if input.len() - at < size.saturating_add(2) {
            return None;
        }
        out.extend_from_slice(&input[at..at + size]);
        at += size;
        if &input[at..at + 2] != b"\r\n" {
            return Some(Err(()));
        }
        at += 2;
    }
}

fn decode_split(data: &[u8], split: usize) -> Result<Option<(Vec<u8>, usize)>, ()> {
    let mut d = ChunkDecoder::new();
    let mut out = Vec::new();
    let mut at = 0;
    for end in [split, data.len()] {
        while at < end {
            let (n, step) = d.step(&data[at..end]).map_err(|_| ())?;
            at += n;
            match step {
                Step::Data(b) => out.extend_from_slice(b),
                Step::Done => return Ok(Some((out, at))),
                Step::More => {}
            }
        }
    }
    Ok(None)
}

fn check_chunked(data: &[u8]) {
    let mine = h1::decode_chunked(data).map_err(|_| ());
    let split = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    assert_eq!(decode_split(data, split), mine, "split at {split}");
    if let Ok(Some((out, used))) = &mine {
        match reference(data) {
            Some(Ok((r_out, r_used))) => {
                assert_eq!(&r_out, out);
                assert_eq!(r_used, *used);
            }
            other => panic!("relay accepted a chunked body the reference gives {other:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_head(data);
    check_chunked(data);
});
