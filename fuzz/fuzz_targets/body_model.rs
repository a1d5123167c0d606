//! Fuzzes reading a request body's top-level `model` (for routing on
//! `/openai/v1/*`) and the splice that renames it for an instance: only the
//! `model` value may change, and the result must still be the same JSON.
#![no_main]

use aoai_lb::rewrite::upstream_body;
use aoai_lb::route::{apply_body_model, classify};
use bytes::Bytes;
use http::Method;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const RENAMED: &str = "renamed-\"deployment\"\\";

fuzz_target!(|data: &[u8]| {
    let Ok(mut route) = classify(&Method::POST, "/openai/v1/chat/completions") else {
        return;
    };
    if apply_body_model(&mut route, data).is_err() {
        return;
    }
    let Some(dep) = route.deployment.clone() else {
        return;
    };
    let span = route.model_span.clone().unwrap();
    // The span is the raw text of the model string, between its quotes.
    let quoted = [&b"\""[..], &data[span.clone()], b"\""].concat();
    let raw: String = serde_json::from_slice(&quoted).unwrap();
    assert_eq!(raw, dep);

    let body = Bytes::copy_from_slice(data);
    let out = upstream_body(&Method::POST, &body, &route, Some(RENAMED));
    // Bytes before and after the value are kept as sent, and the value is
    // the JSON-escaped new name.
    assert_eq!(&out[..span.start], &data[..span.start]);
    assert!(out.ends_with(&data[span.end..]));
    let new_quoted = &out[span.start - 1..out.len() - (data.len() - span.end) + 1];
    assert_eq!(
        serde_json::from_slice::<String>(new_quoted).unwrap(),
        RENAMED
    );

    // Where the body is strict JSON (the routing parser, like serde_json,
    // does not check the UTF-8 of strings it skips, so a body can route and
    // still not be strict JSON), it is an object whose `model` is that
    // name, and the rewrite changed nothing else.
    if let Ok(original) = serde_json::from_slice::<Value>(data) {
        assert!(
            original.is_object(),
            "routed on a body that is not a JSON object"
        );
        assert_eq!(
            original.get("model").and_then(Value::as_str),
            Some(dep.as_str())
        );
        let rewritten: Value = serde_json::from_slice(&out).unwrap();
        let mut expected = original;
        expected["model"] = Value::String(RENAMED.to_owned());
        assert_eq!(rewritten, expected, "more than `model` changed");
    }
    // Unmapped: the very same bytes.
    assert_eq!(
        upstream_body(&Method::POST, &body, &route, Some(dep.as_str())),
        body
    );
    assert!(upstream_body(&Method::GET, &body, &route, Some(RENAMED)).is_empty());
});
