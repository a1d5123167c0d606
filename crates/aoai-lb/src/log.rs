//! Phase 7: the access record, one per request.
//!
//! Owns what the access line says: time, request ids, method, the path
//! without its query string (queries can carry secrets), deployment, the
//! client's name, every
//! attempt (instance, outcome, status, ms), the final instance and status,
//! time to first byte, total time, bytes and whether the body streamed. It
//! never holds a key, a header value other than the two ids, or a body.
//!
//! The record is written through [`crate::logging::access`] exactly once:
//! when the response body ends, is aborted, or is dropped because the
//! client went away (see [`crate::stream`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method};
use serde::{Serialize, Serializer};
use serde_json::ser::{CompactFormatter, Formatter};

use crate::backend::Backend;

/// One attempt on one instance.
#[derive(Serialize, Clone)]
pub struct Attempt {
    /// The instance's configured name.
    pub instance: InstanceName,
    /// `ok`, `client_error`, `throttled`, `server_error`, `timeout`,
    /// `connect_error`, `backend_auth_error` or `deployment_not_found`.
    pub outcome: &'static str,
    /// The response status, when headers arrived.
    pub status: Option<u16>,
    /// Time from sending to the verdict, in ms.
    pub ms: f64,
    /// When the attempt was sent (for its trace span; not logged).
    #[serde(skip)]
    pub started: Instant,
}

/// An instance's name in a record, shared rather than copied.
#[derive(Clone)]
pub struct InstanceName(pub Arc<Backend>);

impl InstanceName {
    /// The configured name.
    pub fn as_str(&self) -> &str {
        self.0.name()
    }
}

impl Serialize for InstanceName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The access line. Field names and meanings are a contract with log
/// consumers.
#[derive(Serialize)]
pub struct AccessRecord {
    /// RFC 3339 UTC with milliseconds, when the record is written.
    pub timestamp: String,
    /// Always `INFO`.
    pub level: &'static str,
    /// Always `aoai_lb::access`.
    pub target: &'static str,
    /// Always `request`.
    pub message: &'static str,
    /// The client's `x-ms-client-request-id`, or a generated id.
    #[serde(serialize_with = "header_str")]
    pub request_id: HeaderValue,
    /// Azure's `apim-request-id` from the final response.
    #[serde(serialize_with = "opt_header_str")]
    pub apim_request_id: Option<HeaderValue>,
    /// The request method.
    #[serde(serialize_with = "method_str")]
    pub method: Method,
    /// The client's path, without the query string.
    pub path: String,
    /// The client-facing deployment, when the request names one.
    pub deployment: Option<String>,
    /// The client's configured name (`default` for `API_KEY`); `null`
    /// when the request named no known client.
    #[serde(serialize_with = "opt_arc_str")]
    pub client: Option<Arc<str>>,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// Instances passed over for lack of predicted rate-limit room
    /// (`{"instance", "reason"}`, reason `tokens`, `requests` or
    /// `utilization`); left out when none was.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<crate::steer::Skip>,
    /// The instance that produced the final response.
    pub instance: Option<InstanceName>,
    /// The status sent to the client.
    pub status: u16,
    /// Time from request start to the first response body byte.
    pub ttfb_ms: Option<f64>,
    /// Time from request start to the end of the response body.
    pub total_ms: f64,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// Whether the body was an event stream.
    pub streamed: bool,
    /// Why the request failed inside the gateway, or how the body ended
    /// badly (`stream_idle_timeout`, `upstream_aborted`,
    /// `client_disconnected`).
    pub error: Option<&'static str>,
    /// Tokens of the response (`prompt`, `completion`, `cached`,
    /// `reasoning`, `source`: `reported` or `estimated`); `null` when the
    /// response carries none (errors, non-inference requests).
    pub usage: Option<crate::usage::Usage>,
    /// The request's trace context while tracing is on ([`crate::otel`]);
    /// `None` otherwise. Not logged.
    #[serde(skip)]
    pub trace: Option<crate::otel::RequestTrace>,
}

fn header_str<S: Serializer>(v: &HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.to_str().unwrap_or("-"))
}

fn opt_header_str<S: Serializer>(v: &Option<HeaderValue>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => header_str(v, s),
        None => s.serialize_none(),
    }
}

fn opt_arc_str<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(v),
        None => s.serialize_none(),
    }
}

fn method_str<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

impl AccessRecord {
    /// An empty record, for moving a real one out of a holder. Allocates
    /// nothing.
    pub fn placeholder() -> Self {
        Self {
            timestamp: String::new(),
            level: "INFO",
            target: "aoai_lb::access",
            message: "request",
            request_id: HeaderValue::from_static("-"),
            apim_request_id: None,
            method: Method::GET,
            path: String::new(),
            deployment: None,
            client: None,
            attempts: Vec::new(),
            skipped: Vec::new(),
            instance: None,
            status: 0,
            ttfb_ms: None,
            total_ms: 0.0,
            bytes: 0,
            streamed: false,
            error: None,
            usage: None,
            trace: None,
        }
    }

    /// Appends the record as one JSON object, without a newline: the same
    /// bytes `serde_json::to_writer` writes for the derived `Serialize`
    /// (field order, string escaping, number formatting, `null` for absent
    /// values and non-finite floats), written field by field with
    /// serde_json's own escaping and number routines instead of through the
    /// serde data model. This runs once per request on the request's
    /// thread; a unit test holds it to the derived serialisation.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Every field by name, no `..`: a field added to the record does
        // not compile until it is written here too (or explicitly not).
        let AccessRecord {
            timestamp: _,
            level: _,
            target: _,
            message: _,
            request_id: _,
            apim_request_id: _,
            method: _,
            path: _,
            deployment: _,
            client: _,
            attempts: _,
            skipped,
            instance: _,
            status: _,
            ttfb_ms: _,
            total_ms: _,
            bytes: _,
            streamed: _,
            error: _,
            usage: _,
            trace: _,
        } = self;
        out.extend_from_slice(b"{\"timestamp\":");
        json_str(out, &self.timestamp);
        if (self.level, self.target, self.message) == ("INFO", "aoai_lb::access", "request") {
            // What every record carries: written as the bytes it always is.
            out.extend_from_slice(
                br#","level":"INFO","target":"aoai_lb::access","message":"request""#,
            );
        } else {
            out.extend_from_slice(b",\"level\":");
            json_str(out, self.level);
            out.extend_from_slice(b",\"target\":");
            json_str(out, self.target);
            out.extend_from_slice(b",\"message\":");
            json_str(out, self.message);
        }
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, self.request_id.to_str().unwrap_or("-"));
        out.extend_from_slice(b",\"apim_request_id\":");
        match &self.apim_request_id {
            Some(v) => json_str(out, v.to_str().unwrap_or("-")),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"method\":");
        json_str(out, self.method.as_str());
        out.extend_from_slice(b",\"path\":");
        json_str(out, &self.path);
        out.extend_from_slice(b",\"deployment\":");
        json_opt_str(out, self.deployment.as_deref());
        out.extend_from_slice(b",\"client\":");
        json_opt_str(out, self.client.as_deref());
        out.extend_from_slice(b",\"attempts\":");
        json_array(out, &self.attempts, |out, a| {
            out.extend_from_slice(b"{\"instance\":");
            json_str(out, a.instance.as_str());
            out.extend_from_slice(b",\"outcome\":");
            json_str(out, a.outcome);
            out.extend_from_slice(b",\"status\":");
            json_opt_u64(out, a.status.map(u64::from));
            out.extend_from_slice(b",\"ms\":");
            json_f64(out, a.ms);
            out.push(b'}');
        });
        if !skipped.is_empty() {
            out.extend_from_slice(b",\"skipped\":");
            json_array(out, skipped, |out, skip| {
                out.extend_from_slice(b"{\"instance\":");
                json_str(out, skip.instance.as_str());
                out.extend_from_slice(b",\"reason\":");
                json_str(out, skip.reason);
                out.push(b'}');
            });
        }
        out.extend_from_slice(b",\"instance\":");
        json_opt_str(out, self.instance.as_ref().map(InstanceName::as_str));
        out.extend_from_slice(b",\"status\":");
        json_u64(out, u64::from(self.status));
        out.extend_from_slice(b",\"ttfb_ms\":");
        match self.ttfb_ms {
            Some(v) => json_f64(out, v),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"total_ms\":");
        json_f64(out, self.total_ms);
        out.extend_from_slice(b",\"bytes\":");
        json_u64(out, self.bytes);
        out.extend_from_slice(if self.streamed {
            b",\"streamed\":true,\"error\":"
        } else {
            b",\"streamed\":false,\"error\":"
        });
        json_opt_str(out, self.error);
        out.extend_from_slice(b",\"usage\":");
        match &self.usage {
            Some(u) => {
                out.extend_from_slice(b"{\"prompt\":");
                json_u64(out, u.prompt);
                out.extend_from_slice(b",\"completion\":");
                json_u64(out, u.completion);
                out.extend_from_slice(b",\"cached\":");
                json_u64(out, u.cached);
                out.extend_from_slice(b",\"reasoning\":");
                json_u64(out, u.reasoning);
                out.extend_from_slice(b",\"source\":");
                json_str(out, u.source.as_str());
                out.push(b'}');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }

    /// Writes the record as one line and, while tracing is on, turns it
    /// into the request's spans ([`crate::otel::RequestTrace::export`]).
    pub fn emit(&self) {
        crate::logging::access(self);
        if let Some(t) = &self.trace {
            t.export(self);
        }
    }
}

/// A JSON array (no white space, as serde_json writes it) of `items`,
/// each written by `item`.
fn json_array<T>(out: &mut Vec<u8>, items: &[T], mut item: impl FnMut(&mut Vec<u8>, &T)) {
    out.push(b'[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        item(out, x);
    }
    out.push(b']');
}

/// What serde_json writes for each byte of a string: 0 for the byte
/// itself, `u` for `\u00xx`, else the letter after the backslash (`"`,
/// `\`, and the control characters with a short form).
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = b'u';
        b += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Whether any of the eight bytes of `w` is `"`, `\` or below 0x20: the
/// test for a zero byte (and for a byte below a bound) on a whole word,
/// exact for "any" though not for which one.
fn word_needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let control = below(w, 0x20);
    let quote = below(w ^ (ONES * u64::from(b'"')), 1);
    let backslash = below(w ^ (ONES * u64::from(b'\\')), 1);
    control | quote | backslash != 0
}

/// A JSON string with serde_json's escaping: `"`, `\` and the control
/// characters below U+0020 (the short forms where JSON has them, else
/// `\u00xx` in lower case); everything else, U+007F and non-ASCII
/// included, as is.
///
/// Nearly every string of a record (ids, paths, names, the timestamp)
/// needs no escape, so whole 8-byte words are checked first and copied in
/// one go; only from the first word with something to escape on is the
/// rest looked at byte by byte.
fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut clean = 0;
    for w in bytes.chunks_exact(8) {
        let Ok(w) = <[u8; 8]>::try_from(w) else { break };
        if word_needs_escape(u64::from_le_bytes(w)) {
            break;
        }
        clean += 8;
    }
    // The clean words are copied with whatever follows them up to the
    // first escape.
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        let e = ESCAPE[usize::from(b)];
        if e == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        if e == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(&[b'\\', e]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

// Writing into a Vec cannot fail, so the io::Result of serde_json's
// number routines carries nothing.

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_u64(out: &mut Vec<u8>, v: u64) {
    let _ = CompactFormatter.write_u64(out, v);
}

fn json_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => json_u64(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// serde_json writes NaN and infinities as `null`.
fn json_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        let _ = CompactFormatter.write_f64(out, v);
    } else {
        out.extend_from_slice(b"null");
    }
}

/// Milliseconds as a float, for records.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for `t`.
///
/// Written digit by digit into a fixed buffer: this runs once per request
/// and the formatting machinery costs several times more.
pub fn rfc3339_ms(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    let (hh, mm, ss, ms) = (rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis());
    let Ok(year @ 0..=9999) = u32::try_from(y) else {
        return format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z");
    };
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    // Each value fits its width: hours < 24, minutes and seconds < 60.
    put(0, 4, year);
    put(5, 2, m);
    put(8, 2, day);
    put(11, 2, hh as u32);
    put(14, 2, mm as u32);
    put(17, 2, ss as u32);
    put(20, 3, ms);
    String::from_utf8_lossy(&b).into_owned()
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's well-known algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_as_rfc3339_utc_with_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_767_225_600_123);
        assert_eq!(rfc3339_ms(t), "2026-01-01T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661);
        assert_eq!(rfc3339_ms(t), "2000-02-29T01:01:01.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
        assert_eq!(rfc3339_ms(t), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    fn backend(name: &str) -> Arc<Backend> {
        let doc = serde_json::json!({
            "instances": [{"name": name, "url": "https://127.0.0.1:9", "api_key": "k"}],
        });
        let c = crate::config::Config::from_json(&doc.to_string()).unwrap();
        Arc::new(Backend::new(0, c.instances[0].clone(), &c.circuit_breaker).unwrap())
    }

    fn tricky_record(text: &str, ms: f64) -> AccessRecord {
        let mut r = AccessRecord::placeholder();
        r.timestamp = rfc3339_ms(UNIX_EPOCH + Duration::from_millis(1_767_225_600_123));
        r.request_id = HeaderValue::from_str(&text.replace(['\n', '\r', '\u{7f}'], "_"))
            .unwrap_or(HeaderValue::from_static("x"));
        r.apim_request_id = Some(HeaderValue::from_bytes(b"\xff\xfeopaque").unwrap());
        r.method = Method::from_bytes(b"PATCH").unwrap();
        r.path = format!("/openai/{text}");
        r.deployment = Some(text.to_owned());
        r.client = Some(Arc::from(text));
        r.attempts = vec![
            Attempt {
                instance: InstanceName(backend("east-1")),
                outcome: "throttled",
                status: Some(429),
                ms,
                started: Instant::now(),
            },
            Attempt {
                instance: InstanceName(backend("west")),
                outcome: "connect_error",
                status: None,
                ms: f64::NAN,
                started: Instant::now(),
            },
        ];
        r.skipped = vec![
            crate::steer::Skip {
                instance: InstanceName(backend("ptu-east")),
                reason: "tokens",
            },
            crate::steer::Skip {
                instance: InstanceName(backend("north")),
                reason: "utilization",
            },
        ];
        r.instance = Some(InstanceName(backend("west")));
        r.status = 200;
        r.ttfb_ms = Some(ms / 3.0);
        r.total_ms = ms * 1e6;
        r.bytes = u64::MAX;
        r.streamed = true;
        r.error = Some("client_disconnected");
        r.usage = Some(crate::usage::Usage {
            prompt: 12,
            completion: 0,
            cached: 7,
            reasoning: 1,
            source: crate::usage::Source::Reported,
        });
        r
    }

    #[test]
    fn writes_the_same_bytes_as_the_derived_serialisation() {
        let texts = [
            "plain",
            "",
            "quote \" backslash \\ slash /",
            "controls \u{0}\u{1}\u{8}\u{9}\n\u{c}\r\u{1b}\u{1f}\u{7f}",
            "unicode é ü 漢字 \u{2028}\u{2029} 🦀",
            "</script><!-- & ' %22",
        ];
        let floats = [
            0.0,
            -0.0,
            1.5,
            2.0,
            0.1 + 0.2,
            1e-7,
            123_456_789.123,
            1e21,
            f64::MIN_POSITIVE,
            f64::INFINITY,
        ];
        for text in texts {
            for ms in floats {
                let r = tricky_record(text, ms);
                let mut ours = Vec::new();
                r.write_json(&mut ours);
                let derived = serde_json::to_vec(&r).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&derived),
                    "text {text:?}, ms {ms}"
                );
            }
        }
        // The plainest record too: every optional field absent.
        let r = AccessRecord::placeholder();
        let mut ours = Vec::new();
        r.write_json(&mut ours);
        assert_eq!(ours, serde_json::to_vec(&r).unwrap());
    }

    #[test]
    fn escapes_strings_exactly_as_serde_json_does() {
        let mut texts: Vec<String> = (0u8..=0x7f)
            .flat_map(|b| {
                let c = char::from(b);
                // The byte alone, inside a word, and at each position of
                // an 8-byte word (the word-at-a-time check).
                let mut v = vec![c.to_string(), format!("ab{c}cd")];
                for at in 0..=9 {
                    v.push(format!("{}{c}{}", "x".repeat(at), "y".repeat(17 - at)));
                }
                v
            })
            .collect();
        texts.extend(
            [
                "",
                "é",
                "ü漢字 🦀",
                "\u{7f}\u{80}\u{ff}\u{2028}\u{2029}\u{fffd}",
                "2026-01-01T00:00:00.123Z",
                "/openai/deployments/gpt-4o/chat/completions",
                "0123456789abcdef0123456789abcdef\"",
                "0123456789abcdef0123456789abcde\u{1f}",
                "😀😀😀😀\n😀😀😀😀",
            ]
            .map(String::from),
        );
        for t in texts {
            let mut ours = Vec::new();
            json_str(&mut ours, &t);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                serde_json::to_string(&t).unwrap(),
                "{t:?}"
            );
        }
    }

    #[test]
    fn writes_unusual_level_target_and_message_like_serde() {
        let mut r = AccessRecord::placeholder();
        r.level = "WARN";
        r.target = "x\"y";
        r.message = "m\n";
        let mut ours = Vec::new();
        r.write_json(&mut ours);
        assert_eq!(ours, serde_json::to_vec(&r).unwrap());
    }

    #[test]
    fn serialises_the_contract_fields() {
        let r = AccessRecord {
            timestamp: rfc3339_ms(UNIX_EPOCH),
            level: "INFO",
            target: "aoai_lb::access",
            message: "request",
            request_id: HeaderValue::from_static("abc"),
            apim_request_id: None,
            method: Method::POST,
            path: "/openai/x".to_owned(),
            deployment: Some("gpt-4o".to_owned()),
            client: Some(Arc::from("team-a")),
            attempts: Vec::new(),
            skipped: Vec::new(),
            instance: None,
            status: 200,
            ttfb_ms: Some(1.5),
            total_ms: 2.0,
            bytes: 10,
            streamed: false,
            error: None,
            usage: Some(crate::usage::Usage {
                prompt: 3,
                completion: 2,
                cached: 1,
                reasoning: 0,
                source: crate::usage::Source::Estimated,
            }),
            trace: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "timestamp",
            "level",
            "target",
            "message",
            "request_id",
            "apim_request_id",
            "method",
            "path",
            "deployment",
            "client",
            "attempts",
            "instance",
            "status",
            "ttfb_ms",
            "total_ms",
            "bytes",
            "streamed",
            "error",
            "usage",
        ] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert_eq!(v["method"], "POST");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["client"], "team-a");
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt":3,"completion":2,"cached":1,"reasoning":0,"source":"estimated"})
        );
    }
}
