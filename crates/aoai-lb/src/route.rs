//! Phase 2: classifying a request path (and, where needed, its body).
//!
//! Owns: path validation (no `.`/`..` segments, no encoded slashes, valid
//! UTF-8 after percent-decoding), the `/openai` prefix rule, where the
//! deployment name comes from, and the stateful object id a request names.
//!
//! - `/openai/deployments/{dep}/...`: the deployment is the path segment.
//!   The body is never parsed.
//! - `POST /openai/v1/{chat/completions, completions, embeddings, responses,
//!   audio/*, images/*}` and `POST /openai/responses`: the deployment is the
//!   JSON body's top-level `model`. Non-JSON bodies (multipart uploads) and
//!   bodies without `model` go to any instance.
//! - Everything else under `/openai` (files, batches, models, assistants,
//!   threads, vector stores, GET/DELETE on v1): any instance.
//!
//! A path without the `/openai` prefix gets it, as the seed app did.

use std::ops::Range;

use http::{HeaderMap, Method};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::BadRequest;

/// Where the request's deployment name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// The `{dep}` segment of `/openai/deployments/{dep}/...`.
    PathDeployment,
    /// The query parameter `deployment` (dated realtime) or `model` (v1
    /// realtime) of a WebSocket request.
    QueryDeployment,
    /// The body's top-level `model` (v1 and dated responses, with a body).
    BodyModel,
    /// Not deployment-scoped: any instance may serve it.
    #[default]
    Any,
}

/// The result of classifying a request. The default routes anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// True when the client's path lacks the `/openai` prefix, which the
    /// upstream path then gets.
    pub add_prefix: bool,
    /// Where the deployment comes from.
    pub scope: Scope,
    /// The client-facing deployment name (percent-decoded, or the JSON
    /// string's value); `None` means any instance.
    pub deployment: Option<String>,
    /// Byte range of the raw deployment segment in the client's path.
    pub path_span: Option<Range<usize>>,
    /// Byte range of the `model` string's contents (between the quotes) in
    /// the body.
    pub model_span: Option<Range<usize>>,
    /// Byte range of the deployment parameter's value in the query string
    /// (realtime).
    pub query_span: Option<Range<usize>>,
    /// The stateful object the request names (`file-…`, `batch_…`, `resp_…`,
    /// `thread_…`, `asst_…`, `vs_…`, `ftjob-…`, or a body's
    /// `previous_response_id`), for instance affinity. Not used for
    /// selection yet.
    pub affinity_key: Option<String>,
}

impl Route {
    /// Whether the body must be read and parsed for the `model` field.
    pub fn needs_body_model(&self) -> bool {
        self.scope == Scope::BodyModel
    }
}

/// Classifies `path` (without query string) for `method`.
///
/// # Errors
/// [`BadRequest`] for `.`/`..` segments, encoded slashes or backslashes,
/// bad percent-encoding, and an empty deployment segment.
pub fn classify(method: &Method, path: &str) -> Result<Route, BadRequest> {
    validate_path(path)?;
    let (add_prefix, rest, rest_offset) = if path == "/openai" || path.starts_with("/openai/") {
        (false, &path[7..], 7)
    } else {
        (true, path, 0)
    };

    let mut route = Route {
        add_prefix,
        scope: Scope::Any,
        deployment: None,
        path_span: None,
        model_span: None,
        query_span: None,
        affinity_key: None,
    };

    if let Some(after) = rest.strip_prefix("/deployments/") {
        let len = after.find('/').unwrap_or(after.len());
        let raw = &after[..len];
        if raw.is_empty() {
            return Err(BadRequest::EmptyDeployment);
        }
        let start = rest_offset + "/deployments/".len();
        route.scope = Scope::PathDeployment;
        route.deployment = Some(percent_decode(raw)?);
        route.path_span = Some(start..start + len);
    } else if body_method(method) && model_scoped(rest) {
        route.scope = Scope::BodyModel;
    } else if *method == Method::GET && (rest == "/realtime" || rest == "/v1/realtime") {
        route.scope = Scope::QueryDeployment;
    }
    route.affinity_key = affinity_in_path(rest);
    Ok(route)
}

/// Methods whose requests carry a body that may name the model.
fn body_method(m: &Method) -> bool {
    *m == Method::POST || *m == Method::PUT || *m == Method::PATCH
}

/// Endpoints (after `/openai`) whose body `model` names a deployment.
fn model_scoped(rest: &str) -> bool {
    if rest == "/responses" {
        return true;
    }
    let Some(v1) = rest.strip_prefix("/v1/") else {
        return false;
    };
    let v1 = v1.trim_end_matches('/');
    matches!(
        v1,
        "chat/completions"
            | "completions"
            | "embeddings"
            | "responses"
            | "moderations"
            | "audio/speech"
            | "audio/transcriptions"
            | "audio/translations"
            | "images/generations"
            | "images/edits"
            | "images/variations"
    )
}

fn affinity_in_path(rest: &str) -> Option<String> {
    rest.split('/')
        .find(|seg| crate::affinity::is_object_id(seg))
        .map(str::to_owned)
}

/// Rejects what must never be forwarded: `.`/`..` segments (raw or
/// encoded), encoded `/` or `\`, raw `\`, bad escapes and non-UTF-8 after
/// decoding. The fast path (no `%`, `.` or `\` at all) scans once.
fn validate_path(path: &str) -> Result<(), BadRequest> {
    if !path.starts_with('/') {
        // `*` (OPTIONS) or anything else that is not an origin-form path.
        return Err(BadRequest::NotAPath);
    }
    if !path.bytes().any(|b| matches!(b, b'%' | b'.' | b'\\')) {
        return Ok(());
    }
    if path.contains('\\') {
        return Err(BadRequest::EncodedSlash);
    }
    for seg in path.split('/') {
        if !seg.contains(['%', '.']) {
            continue;
        }
        let decoded = percent_decode(seg)?;
        if decoded == "." || decoded == ".." {
            return Err(BadRequest::DotSegment);
        }
    }
    Ok(())
}

/// Percent-decodes one path segment.
///
/// # Errors
/// An encoded `/` or `\` ([`BadRequest::EncodedSlash`]), a `%` not followed
/// by two hex digits, or a result that is not UTF-8
/// ([`BadRequest::InvalidEncoding`]).
pub fn percent_decode(seg: &str) -> Result<String, BadRequest> {
    if !seg.contains('%') {
        return Ok(seg.to_owned());
    }
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).and_then(|c| hex(*c));
            let lo = b.get(i + 2).and_then(|c| hex(*c));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(BadRequest::InvalidEncoding);
            };
            let byte = hi << 4 | lo;
            if byte == b'/' || byte == b'\\' {
                return Err(BadRequest::EncodedSlash);
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| BadRequest::InvalidEncoding)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Reads the realtime deployment from the query: `deployment=` on the
/// dated surface, `model=` (or `deployment=`) on v1. Without one, the
/// request goes to any instance and the instance answers.
///
/// # Errors
/// [`BadRequest::InvalidEncoding`] or [`BadRequest::EncodedSlash`] for a
/// badly encoded value.
pub fn apply_query_deployment(route: &mut Route, query: Option<&str>) -> Result<(), BadRequest> {
    let Some(q) = query else {
        route.scope = Scope::Any;
        return Ok(());
    };
    let mut found = None;
    let mut pos = 0;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let start = pos + k.len() + 1;
        if (k == "model" || k == "deployment") && !v.is_empty() {
            // `model` wins over `deployment` when both are present (v1).
            if found.is_none() || k == "model" {
                found = Some(start..start + v.len());
            }
        }
        pos += pair.len() + 1;
    }
    match found {
        Some(span) => {
            route.deployment = Some(percent_decode(&q[span.clone()])?);
            route.query_span = Some(span);
        }
        None => route.scope = Scope::Any,
    }
    Ok(())
}

/// Whether a body with these headers should be read as JSON for `model`.
/// Multipart uploads (v1 audio) are not parsed: they go to any instance.
pub fn body_is_json(headers: &HeaderMap) -> bool {
    match headers.get(http::header::CONTENT_TYPE) {
        None => true,
        Some(v) => {
            let v = v.as_bytes();
            let essence = v.split(|&c| c == b';').next().unwrap_or(v).trim_ascii();
            essence.eq_ignore_ascii_case(b"application/json")
                || (essence.len() > 5
                    && essence[..essence.len() - 5].ends_with(b"+")
                    && essence[essence.len() - 4..].eq_ignore_ascii_case(b"json"))
        }
    }
}

#[derive(Deserialize)]
struct TopLevel<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
}

/// Reads the top-level `model` (and `previous_response_id`) of a JSON
/// body into `route`. An empty body leaves the route at any instance.
///
/// # Errors
/// [`BadRequest::MalformedJson`] when the body is not a JSON object, and
/// [`BadRequest::ModelNotString`] when `model` is not a string.
pub fn apply_body_model(route: &mut Route, body: &[u8]) -> Result<(), BadRequest> {
    let trimmed = body.trim_ascii_start();
    if trimmed.is_empty() {
        route.scope = Scope::Any;
        return Ok(());
    }
    // serde would also accept an array for a struct; only an object names
    // a model.
    if trimmed[0] != b'{' {
        return Err(BadRequest::MalformedJson);
    }
    let top: TopLevel<'_> = serde_json::from_slice(body).map_err(|_| BadRequest::MalformedJson)?;
    if let Some(prev) = top.previous_response_id
        && let Ok(id) = serde_json::from_str::<String>(prev.get())
        && route.affinity_key.is_none()
    {
        route.affinity_key = Some(id);
    }
    let Some(raw) = top.model else {
        route.scope = Scope::Any;
        return Ok(());
    };
    let text = raw.get();
    let name: String = serde_json::from_str(text).map_err(|_| BadRequest::ModelNotString)?;
    // `RawValue` borrows the exact bytes of the value from `body`, so its
    // position in the buffer is the splice point for the rewrite.
    let offset = (text.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    if offset >= body.len() || offset + text.len() > body.len() || text.len() < 2 {
        return Err(BadRequest::MalformedJson);
    }
    route.model_span = Some(offset + 1..offset + text.len() - 1);
    route.deployment = Some(name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(p: &str) -> Result<Route, BadRequest> {
        classify(&Method::POST, p)
    }

    #[test]
    fn takes_the_deployment_from_a_dated_path() {
        let p = "/openai/deployments/gpt-4o/chat/completions";
        let r = post(p).unwrap();
        assert_eq!(r.scope, Scope::PathDeployment);
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(&p[r.path_span.clone().unwrap()], "gpt-4o");
        assert!(!r.add_prefix);
    }

    #[test]
    fn adds_the_openai_prefix_when_missing() {
        let p = "/deployments/gpt-4o/embeddings";
        let r = post(p).unwrap();
        assert!(r.add_prefix);
        assert_eq!(&p[r.path_span.clone().unwrap()], "gpt-4o");
        assert!(post("/v1/chat/completions").unwrap().add_prefix);
    }

    #[test]
    fn decodes_a_percent_encoded_deployment() {
        let r = post("/openai/deployments/gpt%2D4o/chat/completions").unwrap();
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn v1_posts_route_by_body_model_and_gets_by_any() {
        assert_eq!(
            post("/openai/v1/chat/completions").unwrap().scope,
            Scope::BodyModel
        );
        assert_eq!(post("/openai/responses").unwrap().scope, Scope::BodyModel);
        assert_eq!(
            classify(&Method::GET, "/openai/v1/models").unwrap().scope,
            Scope::Any
        );
        assert_eq!(
            classify(&Method::DELETE, "/openai/v1/responses/resp_1")
                .unwrap()
                .scope,
            Scope::Any
        );
        assert_eq!(post("/openai/v1/files").unwrap().scope, Scope::Any);
        assert_eq!(post("/openai/files").unwrap().scope, Scope::Any);
    }

    #[test]
    fn rejects_dot_segments_and_encoded_slashes() {
        for p in [
            "/openai/../admin",
            "/openai/deployments/../x",
            "/openai/%2e%2e/x",
            "/openai/.%2E/x",
            "/openai/./x",
        ] {
            assert_eq!(post(p), Err(BadRequest::DotSegment), "{p}");
        }
        for p in [
            "/openai/deployments/a%2Fb/chat/completions",
            "/openai/deployments/a%2fb/x",
            "/openai/a%5Cb",
            "/openai/a\\b",
        ] {
            assert_eq!(post(p), Err(BadRequest::EncodedSlash), "{p}");
        }
        for p in ["/openai/%ff%fe", "/openai/%zz", "/openai/%4"] {
            assert_eq!(post(p), Err(BadRequest::InvalidEncoding), "{p}");
        }
        // Dots inside a segment are fine.
        assert!(post("/openai/deployments/gpt-3.5/chat/completions").is_ok());
    }

    #[test]
    fn rejects_an_empty_deployment() {
        assert_eq!(classify(&Method::OPTIONS, "*"), Err(BadRequest::NotAPath));
        assert_eq!(
            post("/openai/deployments//chat/completions"),
            Err(BadRequest::EmptyDeployment)
        );
    }

    #[test]
    fn records_object_ids_for_affinity() {
        let r = classify(&Method::GET, "/openai/files/file-abc123/content").unwrap();
        assert_eq!(r.affinity_key.as_deref(), Some("file-abc123"));
        let r = post("/openai/threads/thread_9/runs").unwrap();
        assert_eq!(r.affinity_key.as_deref(), Some("thread_9"));
        let r = classify(&Method::GET, "/openai/batches/batch_7").unwrap();
        assert_eq!(r.affinity_key.as_deref(), Some("batch_7"));
        assert_eq!(post("/openai/files").unwrap().affinity_key, None);
    }

    #[test]
    fn finds_the_top_level_model_span() {
        let body = br#"{"messages":[{"model":"nested"}], "model" : "gpt-4o", "x":1}"#;
        let mut r = post("/openai/v1/chat/completions").unwrap();
        apply_body_model(&mut r, body).unwrap();
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(&body[r.model_span.clone().unwrap()], b"gpt-4o");
    }

    #[test]
    fn reads_previous_response_id_for_affinity() {
        let body = br#"{"model":"m","previous_response_id":"resp_42"}"#;
        let mut r = post("/openai/v1/responses").unwrap();
        apply_body_model(&mut r, body).unwrap();
        assert_eq!(r.affinity_key.as_deref(), Some("resp_42"));
    }

    #[test]
    fn rejects_malformed_json_when_model_is_needed() {
        let mut r = post("/openai/v1/chat/completions").unwrap();
        assert_eq!(
            apply_body_model(&mut r, b"{\"model\": \"x\""),
            Err(BadRequest::MalformedJson)
        );
        assert_eq!(
            apply_body_model(&mut r, b"[1,2]"),
            Err(BadRequest::MalformedJson)
        );
        assert_eq!(
            apply_body_model(&mut r, br#"{"model": 5}"#),
            Err(BadRequest::ModelNotString)
        );
    }

    #[test]
    fn a_body_without_model_goes_to_any_instance() {
        let mut r = post("/openai/v1/chat/completions").unwrap();
        apply_body_model(&mut r, br#"{"messages":[]}"#).unwrap();
        assert_eq!(r.scope, Scope::Any);
        assert_eq!(r.deployment, None);
    }

    #[test]
    fn reads_the_realtime_deployment_from_the_query() {
        let mut r = classify(&Method::GET, "/openai/realtime").unwrap();
        assert_eq!(r.scope, Scope::QueryDeployment);
        let q = "api-version=2025-04-01-preview&deployment=gpt-4o-rt";
        apply_query_deployment(&mut r, Some(q)).unwrap();
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o-rt"));
        assert_eq!(&q[r.query_span.clone().unwrap()], "gpt-4o-rt");
        let mut r = classify(&Method::GET, "/openai/v1/realtime").unwrap();
        apply_query_deployment(&mut r, Some("model=rt")).unwrap();
        assert_eq!(r.deployment.as_deref(), Some("rt"));
        let mut r = classify(&Method::GET, "/openai/v1/realtime").unwrap();
        apply_query_deployment(&mut r, None).unwrap();
        assert_eq!(r.scope, Scope::Any);
    }

    #[test]
    fn recognises_json_content_types() {
        let mut h = HeaderMap::new();
        assert!(body_is_json(&h));
        h.insert(
            "content-type",
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(body_is_json(&h));
        h.insert(
            "content-type",
            "multipart/form-data; boundary=x".parse().unwrap(),
        );
        assert!(!body_is_json(&h));
    }
}
