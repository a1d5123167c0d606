//! One response's usage, from its first byte to its end.
//!
//! A [`Meter`] rides along with a successful inference response on its way
//! to the client: an event stream goes through [`SseScanner`] (which may
//! remove the usage chunk the gateway asked for), a JSON body through
//! [`BodyUsage`]. When the body ends, [`Meter::finish`] gives the usage:
//! the reported one when it arrived, otherwise a tokenizer estimate of the
//! prompt and of the text streamed so far, marked estimated.

use bytes::Bytes;

use super::body::BodyUsage;
use super::estimate::{self, Encoding};
use super::sse::SseScanner;
use super::{Endpoint, Source, Usage};

enum Reader {
    Sse(SseScanner),
    Json(BodyUsage),
}

/// Reads one response's usage. See the module docs.
pub struct Meter {
    endpoint: Endpoint,
    encoding: Encoding,
    /// The client's request body, for a prompt estimate (shared, not
    /// copied).
    request: Bytes,
    reader: Reader,
}

impl Meter {
    /// A meter for a response from `endpoint`. `sse`: the response is an
    /// event stream. `strip`: the gateway added `include_usage`, so the
    /// usage chunk is removed. `model` (the deployment or the body's
    /// `model`) picks the tokenizer for estimates of `request`.
    pub fn new(endpoint: Endpoint, sse: bool, strip: bool, model: &str, request: Bytes) -> Self {
        let reader = if sse {
            Reader::Sse(SseScanner::new(endpoint, strip))
        } else {
            Reader::Json(BodyUsage::new())
        };
        Self {
            endpoint,
            encoding: Encoding::for_model(model),
            request,
            reader,
        }
    }

    /// Sees a chunk on its way to the client; returns what is sent instead
    /// (empty while an event is held back in strip mode).
    pub fn data(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.reader {
            Reader::Sse(s) => s.push(chunk).unwrap_or_default(),
            Reader::Json(j) => {
                j.push(&chunk);
                chunk
            }
        }
    }

    /// The instance's body ended cleanly: bytes still held back, if any,
    /// to send before the end.
    pub fn flush(&mut self) -> Option<Bytes> {
        match &mut self.reader {
            Reader::Sse(s) => s.finish(),
            Reader::Json(_) => None,
        }
    }

    /// The usage once the body has ended; `complete` is false when it was
    /// cut short (client gone, instance failed, idle timeout).
    ///
    /// - reported usage when it arrived, whatever happened after;
    /// - a stream without it: estimated prompt plus the text streamed;
    /// - a JSON body cut before its usage: the estimated prompt;
    /// - a complete JSON body without usage: `None`.
    pub fn finish(&mut self, complete: bool) -> Option<Usage> {
        match &self.reader {
            Reader::Sse(s) => Some(s.usage().unwrap_or_else(|| {
                let (text, pieces, extra) = s.streamed();
                Usage {
                    prompt: self.prompt_estimate(),
                    completion: estimate::streamed_tokens(self.encoding, text, pieces, extra),
                    source: Source::Estimated,
                    ..Usage::default()
                }
            })),
            Reader::Json(j) => match j.usage() {
                Some(u) => Some(u),
                None if !complete => Some(Usage {
                    prompt: self.prompt_estimate(),
                    source: Source::Estimated,
                    ..Usage::default()
                }),
                None => None,
            },
        }
    }

    /// True when [`Meter::finish`] would estimate and the tokenizer it
    /// needs is not built yet (it takes a fraction of a second, once).
    pub fn estimate_is_slow(&self, complete: bool) -> bool {
        let estimates = match &self.reader {
            Reader::Sse(s) => s.usage().is_none(),
            Reader::Json(j) => j.usage().is_none() && !complete,
        };
        estimates && !self.encoding.is_ready()
    }

    /// Whether this meter may remove bytes (strip mode on a stream).
    pub fn strips(&self) -> bool {
        matches!(&self.reader, Reader::Sse(s) if s.strips())
    }

    /// Whether the usage chunk was removed from the stream.
    pub fn removed(&self) -> bool {
        matches!(&self.reader, Reader::Sse(s) if s.removed())
    }

    fn prompt_estimate(&self) -> u64 {
        estimate::prompt_tokens_in(self.encoding, self.endpoint, &self.request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = br#"{"messages":[{"role":"user","content":"hello world"}],"stream":true}"#;

    #[test]
    fn a_cut_stream_is_estimated_from_prompt_and_streamed_text() {
        let mut m = Meter::new(
            Endpoint::Chat,
            true,
            true,
            "gpt-4o",
            Bytes::from_static(REQ),
        );
        let out = m.data(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"This\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" is\"}}]}\n\ndata: {\"cho",
        ));
        assert!(out.ends_with(b"\n\n"), "the unfinished event is held back");
        let u = m.finish(false).unwrap();
        assert_eq!(u.source, Source::Estimated);
        let e = Encoding::O200k;
        assert_eq!(u.prompt, 3 + 3 + e.count("user") + e.count("hello world"));
        assert_eq!(u.completion, 2);
    }

    #[test]
    fn a_json_body_reports_its_usage_or_nothing() {
        let mut m = Meter::new(
            Endpoint::Embeddings,
            false,
            false,
            "text-embedding-3-small",
            Bytes::new(),
        );
        let body =
            Bytes::from_static(br#"{"data":[],"usage":{"prompt_tokens":4,"total_tokens":4}}"#);
        assert_eq!(m.data(body.clone()), body);
        assert_eq!(m.finish(true).unwrap().prompt, 4);
        let mut m = Meter::new(Endpoint::Chat, false, false, "gpt-4o", Bytes::new());
        m.data(Bytes::from_static(b"{}"));
        assert_eq!(m.finish(true), None);
    }
}
