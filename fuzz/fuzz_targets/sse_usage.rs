//! Fuzzes the stream usage scanner: whatever the bytes and wherever the
//! chunks are cut, read mode passes every byte through unchanged, strip
//! mode gives the same bytes for every cut (removing at most one
//! contiguous event, which must be a usage chunk) and both find the same
//! usage. The JSON body tracker must find the same usage for every cut.
#![no_main]

use aoai_lb::usage::Endpoint;
use aoai_lb::usage::body::BodyUsage;
use aoai_lb::usage::sse::SseScanner;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn run(strip: bool, data: &[u8], cuts: &[usize]) -> (Vec<u8>, SseScanner) {
    let mut s = SseScanner::new(Endpoint::Chat, strip);
    let mut out = Vec::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        if let Some(b) = s.push(Bytes::copy_from_slice(&data[prev..c])) {
            out.extend_from_slice(&b);
        }
        prev = c;
    }
    if let Some(b) = s.finish() {
        out.extend_from_slice(&b);
    }
    (out, s)
}

fn body_usage(data: &[u8], cuts: &[usize]) -> Option<aoai_lb::usage::Usage> {
    let mut t = BodyUsage::new();
    let mut prev = 0;
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        t.push(&data[prev..c]);
        prev = c;
    }
    t.usage()
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many cut points follow (each one byte, scaled).
    let Some((&n, rest)) = input.split_first() else {
        return;
    };
    let n = usize::from(n % 16).min(rest.len());
    let (cut_bytes, data) = rest.split_at(n);
    let mut cuts: Vec<usize> = cut_bytes
        .iter()
        .map(|&c| usize::from(c) * data.len() / 256)
        .collect();
    cuts.sort_unstable();

    let (read_whole, r0) = run(false, data, &[]);
    let (read_cut, r1) = run(false, data, &cuts);
    assert_eq!(read_whole, data, "read mode changed bytes");
    assert_eq!(read_cut, data, "read mode changed bytes when cut");
    assert_eq!(r0.usage(), r1.usage());

    let (strip_whole, s0) = run(true, data, &[]);
    let (strip_cut, s1) = run(true, data, &cuts);
    assert_eq!(strip_whole, strip_cut, "strip mode depends on the cuts");
    assert_eq!(s0.removed(), s1.removed());
    assert_eq!(s0.usage(), s1.usage());
    if s0.removed() {
        // Exactly one contiguous range went, and it held a usage object.
        let keep_front = strip_whole
            .iter()
            .zip(data)
            .take_while(|(a, b)| a == b)
            .count();
        let removed = data.len() - strip_whole.len();
        assert_eq!(&strip_whole[keep_front..], &data[keep_front + removed..]);
        let gone = &data[keep_front..keep_front + removed];
        assert!(gone.windows(7).any(|w| w == b"\"usage\""));
    } else {
        assert_eq!(strip_whole, data);
    }

    assert_eq!(body_usage(data, &[]), body_usage(data, &cuts));
});
