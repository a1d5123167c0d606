//! Asking the instance for a stream's usage on the client's behalf.
//!
//! A streaming chat completion reports its usage only when the request
//! says `stream_options: {"include_usage": true}`. When the client did not
//! ask and the api-version accepts the option (2024-09-01-preview and
//! later, or the `/openai/v1` surface), [`plan`] adds it to the upstream
//! body by splicing bytes in: every other byte of the client's body is
//! kept. The response's usage chunk is then removed again before the client
//! sees it ([`super::sse::SseScanner`] in strip mode), so the client gets
//! exactly the bytes it would have got without the gateway.
//!
//! Only chat completions are changed. Legacy completions streams are read
//! when the client asked for usage and estimated otherwise; the Responses
//! API always reports usage in `response.completed` and has no such option.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Endpoint;

/// The earliest dated api-version that accepts `stream_options`.
pub const FIRST_STREAM_OPTIONS_VERSION: &str = "2024-09-01-preview";

/// How a request's usage will be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not a stream: the body's `usage` is read.
    Body,
    /// A stream whose usage chunk the client asked for: read it, change
    /// nothing.
    ClientAsked,
    /// A stream that gets `include_usage` from the gateway: send this body
    /// upstream instead of the client's and remove the usage chunk from the
    /// response.
    Injected(Bytes),
    /// A stream whose usage event always comes (Responses API): read it.
    Reported,
    /// A stream without usage (old api-version, legacy completions, a body
    /// the gateway cannot safely change): estimate.
    Estimate,
}

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    /// Present even when `null` (a plain `Option` would read `null` as
    /// absent, and a second `stream_options` key would be added).
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Options<'a> {
    #[serde(borrow, default)]
    include_usage: Option<&'a RawValue>,
}

/// Decides how the usage of a request to `endpoint` will be known and, for
/// an injected stream, builds the upstream body. `path` is the client's
/// path and `query` its query string (for `api-version`).
pub fn plan(endpoint: Endpoint, path: &str, query: Option<&str>, body: &Bytes) -> Plan {
    if endpoint == Endpoint::Embeddings {
        return Plan::Body;
    }
    let Ok(top) = serde_json::from_slice::<Top<'_>>(body) else {
        return Plan::Body;
    };
    if top.stream.map(RawValue::get) != Some("true") {
        return Plan::Body;
    }
    if endpoint == Endpoint::Responses {
        return Plan::Reported;
    }
    let opts = match top.stream_options {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => match serde_json::from_str::<Options<'_>>(raw.get()) {
            Ok(o) => Some((raw, o)),
            // Not an object: Azure rejects it; nothing to add to.
            Err(_) => return Plan::Estimate,
        },
    };
    if let Some((_, o)) = &opts
        && o.include_usage.map(RawValue::get) == Some("true")
    {
        return Plan::ClientAsked;
    }
    if endpoint != Endpoint::Chat || !accepts_stream_options(path, query) {
        return Plan::Estimate;
    }
    let spliced = match (top.stream_options, opts) {
        (None, _) => {
            insert_after_open_brace(body, 0, br#""stream_options":{"include_usage":true}"#)
        }
        (Some(raw), None) => replace(body, raw.get(), br#"{"include_usage":true}"#),
        (Some(_), Some((raw, o))) => match o.include_usage {
            Some(v) => replace(body, v.get(), b"true"),
            None => offset_in(body, raw.get())
                .and_then(|at| insert_after_open_brace(body, at, br#""include_usage":true"#)),
        },
    };
    match spliced {
        Some(b) => Plan::Injected(b),
        None => Plan::Estimate,
    }
}

/// Whether the request's api-version accepts `stream_options`: the
/// `/openai/v1` surface always does; on the dated surface, a version dated
/// 2024-09-01 or later (`-preview` or not), or `preview`/`latest`/`v1`.
pub fn accepts_stream_options(path: &str, query: Option<&str>) -> bool {
    if Endpoint::is_v1_path(path) {
        return true;
    }
    let Some(v) = query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("api-version=")))
    else {
        return false;
    };
    match v {
        "preview" | "latest" | "v1" => true,
        _ => {
            let date = v.get(..10).unwrap_or("");
            let well_formed = date.len() == 10
                && date.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                });
            well_formed && date >= &FIRST_STREAM_OPTIONS_VERSION[..10]
        }
    }
}

/// Where `inner` (borrowed from `body`) starts in `body`.
fn offset_in(body: &[u8], inner: &str) -> Option<usize> {
    let at = (inner.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    (at + inner.len() <= body.len()).then_some(at)
}

/// `body` with `inner` (borrowed from it) replaced by `with`.
fn replace(body: &Bytes, inner: &str, with: &[u8]) -> Option<Bytes> {
    let at = offset_in(body, inner)?;
    let mut out = BytesMut::with_capacity(body.len() - inner.len() + with.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(with);
    out.extend_from_slice(&body[at + inner.len()..]);
    Some(out.freeze())
}

/// `body` with `member` inserted as the first member of the object that
/// starts at or after `from` (its `{` is the first non-space byte), with a
/// comma when the object has other members.
fn insert_after_open_brace(body: &Bytes, from: usize, member: &[u8]) -> Option<Bytes> {
    let rest = body.get(from..)?;
    let lead = rest.len() - rest.trim_ascii_start().len();
    let brace = from + lead;
    if body.get(brace) != Some(&b'{') {
        return None;
    }
    let after = &body[brace + 1..];
    let empty = after.trim_ascii_start().first() == Some(&b'}');
    let mut out = BytesMut::with_capacity(body.len() + member.len() + 1);
    out.extend_from_slice(&body[..=brace]);
    out.extend_from_slice(member);
    if !empty {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(after);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DATED: &str = "/openai/deployments/gpt-4o/chat/completions";
    const NEW: Option<&str> = Some("api-version=2024-10-21");

    fn injected(p: Plan) -> String {
        match p {
            Plan::Injected(b) => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("not injected: {other:?}"),
        }
    }

    #[test]
    fn adds_stream_options_as_the_first_member() {
        let body = Bytes::from_static(br#" {"messages":[],"stream":true}"#);
        assert_eq!(
            injected(plan(Endpoint::Chat, DATED, NEW, &body)),
            r#" {"stream_options":{"include_usage":true},"messages":[],"stream":true}"#
        );
    }

    #[test]
    fn completes_existing_stream_options() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(
            injected(plan(
                Endpoint::Chat,
                DATED,
                NEW,
                &b(r#"{"stream":true,"stream_options":{ }}"#)
            )),
            r#"{"stream":true,"stream_options":{"include_usage":true }}"#
        );
        assert_eq!(
            injected(plan(
                Endpoint::Chat,
                DATED,
                NEW,
                &b(r#"{"stream":true,"stream_options": {"include_obfuscation":false}}"#)
            )),
            r#"{"stream":true,"stream_options": {"include_usage":true,"include_obfuscation":false}}"#
        );
        assert_eq!(
            injected(plan(
                Endpoint::Chat,
                DATED,
                NEW,
                &b(r#"{"stream":true,"stream_options":{"include_usage":false}}"#)
            )),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            injected(plan(
                Endpoint::Chat,
                DATED,
                NEW,
                &b(r#"{"stream":true,"stream_options":null}"#)
            )),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn leaves_what_needs_no_injection() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let asked = b(r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert_eq!(plan(Endpoint::Chat, DATED, NEW, &asked), Plan::ClientAsked);
        assert_eq!(
            plan(Endpoint::Completions, DATED, NEW, &asked),
            Plan::ClientAsked
        );
        let stream = b(r#"{"stream":true}"#);
        assert_eq!(
            plan(
                Endpoint::Chat,
                DATED,
                Some("api-version=2024-08-01-preview"),
                &stream
            ),
            Plan::Estimate
        );
        assert_eq!(plan(Endpoint::Chat, DATED, None, &stream), Plan::Estimate);
        assert_eq!(
            plan(Endpoint::Completions, DATED, NEW, &stream),
            Plan::Estimate
        );
        assert_eq!(
            plan(Endpoint::Responses, "/openai/v1/responses", None, &stream),
            Plan::Reported
        );
        assert_eq!(
            plan(Endpoint::Chat, DATED, NEW, &b(r#"{"stream":false}"#)),
            Plan::Body
        );
        assert_eq!(plan(Endpoint::Embeddings, DATED, NEW, &stream), Plan::Body);
        assert_eq!(
            plan(
                Endpoint::Chat,
                DATED,
                NEW,
                &b(r#"{"stream":true,"stream_options":1}"#)
            ),
            Plan::Estimate
        );
        assert_eq!(plan(Endpoint::Chat, DATED, NEW, &b("not json")), Plan::Body);
    }

    #[test]
    fn api_versions_from_2024_09_01_preview_and_v1_accept_stream_options() {
        for (q, ok) in [
            ("api-version=2024-09-01-preview", true),
            ("api-version=2024-10-21", true),
            ("x=1&api-version=2025-04-01-preview", true),
            ("api-version=preview", true),
            ("api-version=2024-08-01-preview", false),
            ("api-version=2024-06-01", false),
            ("api-version=2023-05-15", false),
            ("api-version=garbage-and-more", false),
            ("api-version=", false),
        ] {
            assert_eq!(accepts_stream_options(DATED, Some(q)), ok, "{q}");
        }
        assert!(accepts_stream_options("/openai/v1/chat/completions", None));
        assert!(!accepts_stream_options(DATED, None));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn the_injected_body_is_the_clients_plus_include_usage(
            fields in proptest::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,10}", 0..5),
            ws in "[ \n\t]{0,2}",
            opts in 0u8..4,
        ) {
            let mut doc = format!("{{{ws}\"stream\"{ws}:{ws}true");
            match opts {
                1 => doc.push_str(",\"stream_options\":{}"),
                2 => doc.push_str(",\"stream_options\":{\"include_usage\":false}"),
                3 => doc.push_str(",\"stream_options\":null"),
                _ => {}
            }
            for (k, v) in &fields {
                if k == "stream" || k == "stream_options" { continue; }
                doc.push_str(&format!(",{ws}{}:{ws}{}", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap()));
            }
            doc.push('}');
            let body = Bytes::from(doc.clone());
            let out = injected(plan(Endpoint::Chat, DATED, NEW, &body));
            let mut want: serde_json::Value = serde_json::from_str(&doc).unwrap();
            want["stream_options"] = serde_json::json!({"include_usage": true});
            let got: serde_json::Value = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(got, want);
            if opts == 0 {
                // Everything the client sent follows the added member as is.
                let added = r#""stream_options":{"include_usage":true},"#;
                prop_assert_eq!(&out[..1], "{");
                prop_assert_eq!(&out[1..1 + added.len()], added);
                prop_assert_eq!(&out[1 + added.len()..], &doc[1..]);
            }
        }
    }
}
