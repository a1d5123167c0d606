//! Splits a server-sent-event byte stream into events without buffering the
//! whole body, so that each event can be timestamped at the moment the frame
//! that completes it arrives.
//!
//! Only the framing matters here: an event ends at a blank line (`\n\n`, with
//! optional `\r` before each `\n`). The payload is kept only until its event
//! completes, to tell the `[DONE]` terminator apart from data events.

/// What one completed event was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A `data:` event other than the terminator.
    Data,
    /// The `data: [DONE]` terminator.
    Done,
}

/// Incremental SSE framer. Feed it body frames in order; it reports the
/// events each frame completes.
#[derive(Debug, Default)]
pub struct Framer {
    current: Vec<u8>,
    after_newline: bool,
}

impl Framer {
    /// Creates a framer with no partial event.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes one body frame and calls `on_event` once per event that the
    /// frame completes, in order. Bytes of an unfinished event are kept for
    /// the next frame.
    pub fn feed(&mut self, frame: &[u8], mut on_event: impl FnMut(Event)) {
        for &b in frame {
            match b {
                b'\n' if self.after_newline => {
                    self.after_newline = false;
                    let event = if contains(&self.current, b"[DONE]") {
                        Event::Done
                    } else {
                        Event::Data
                    };
                    // A lone blank line (keep-alive or stray separator) is not an event.
                    if !self.current.iter().all(|c| c.is_ascii_whitespace()) {
                        on_event(event);
                    }
                    self.current.clear();
                }
                b'\n' => {
                    self.after_newline = true;
                    self.current.push(b);
                }
                b'\r' => {}
                _ => {
                    self.after_newline = false;
                    self.current.push(b);
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events_of(frames: &[&[u8]]) -> Vec<(usize, Event)> {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            framer.feed(f, |e| out.push((i, e)));
        }
        out
    }

    #[test]
    fn reports_each_event_at_the_frame_that_completes_it() {
        let got = events_of(&[b"data: {\"a\":1}\n", b"\ndata: {\"b\"", b":2}\n\n"]);
        assert_eq!(got, vec![(1, Event::Data), (2, Event::Data)]);
    }

    #[test]
    fn reports_several_events_coalesced_in_one_frame() {
        let got = events_of(&[b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"]);
        assert_eq!(
            got,
            vec![(0, Event::Data), (0, Event::Data), (0, Event::Done)]
        );
    }

    #[test]
    fn accepts_crlf_line_endings() {
        let got = events_of(&[b"data: 1\r\n\r\n", b"data: [DONE]\r\n\r\n"]);
        assert_eq!(got, vec![(0, Event::Data), (1, Event::Done)]);
    }

    #[test]
    fn ignores_blank_lines_between_events() {
        let got = events_of(&[b"\n\n\n\ndata: 1\n\n"]);
        assert_eq!(got, vec![(0, Event::Data)]);
    }

    #[test]
    fn keeps_an_unfinished_event_pending() {
        let got = events_of(&[b"data: 1\n"]);
        assert!(got.is_empty());
    }
}
