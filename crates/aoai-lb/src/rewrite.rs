//! Phase 4: the upstream request, built from the client's.
//!
//! Owns every change made to a request on its way to an instance, and the
//! headers removed from a response on its way back. Nothing else changes:
//!
//! - URL: the instance's base URL (its path prefix kept) + the client path
//!   (with `/openai` added when missing, and the deployment segment renamed
//!   per the instance's `deployments` map) + the query string, untouched
//!   except for a realtime request's renamed `deployment`/`model` value and
//!   the removal of any `api-key` parameter (a client credential).
//! - Headers: every client credential (`authorization`, `api-key`,
//!   `proxy-authorization`, `cookie`, `ocp-apim-subscription-key`,
//!   `x-api-key`, the `x-ms-token-*` / `x-ms-client-principal*` headers of
//!   App Service authentication, a key in a WebSocket subprotocol) is
//!   removed and the instance's own credential set; `Host` is overwritten; hop-by-hop headers are
//!   removed (RFC 9110 §7.6.1); `x-ms-client-request-id` carries the request
//!   id.
//! - Body: on `/openai/v1/*` and `/openai/responses` only the bytes of the
//!   top-level `model` string's value change, and only when the instance
//!   maps the name; every other byte is kept as sent. GET and HEAD send no
//!   body.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Uri};

use crate::backend::Backend;
use crate::route::Route;

/// `x-ms-client-request-id`: the request id Azure echoes and logs.
pub static CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-client-request-id");
/// `api-key`: Azure's key header.
pub static API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Hop-by-hop headers that are always removed (RFC 9110 §7.6.1 lists
/// Connection and the fields it names, plus Proxy-Connection, Keep-Alive,
/// TE, Transfer-Encoding and Upgrade; RFC 9110 §6.6.2 adds Trailer).
/// Connection and Upgrade come first: [`strip_hop_by_hop`] keeps them for a
/// WebSocket handshake by position.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether the request asks to switch to WebSocket (`Connection: upgrade`
/// with `Upgrade: websocket`). This must be checked before
/// [`strip_hop_by_hop`], which removes exactly those headers.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| has_token(v.as_bytes(), b"websocket"));
    upgrade
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: every field named in `Connection`, then the
/// fixed list. With `keep_upgrade`, `Connection: upgrade` and `Upgrade`
/// survive so a WebSocket handshake can pass.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    remove_connection_named(headers, keep_upgrade);
    // Connection and Upgrade are the first two of the list.
    let skip = if keep_upgrade { 0b11 } else { 0 };
    remove_listed(headers, &HOP_BY_HOP, skip);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn remove_connection_named(headers: &mut HeaderMap, keep_upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        // Collected first: the map cannot be changed while its values are
        // borrowed. Connection headers are short and rare on the hot path.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&c| c == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .collect();
        for name in named {
            if keep_upgrade && name == header::UPGRADE {
                continue;
            }
            headers.remove(&name);
        }
    }
}

/// Removes every header of `listed` (at most 32) that is present, except
/// those whose bit is set in `skip`. A request or response carries a
/// handful of headers, so one pass comparing names finds the few to remove
/// for less than hashing every listed name in a `remove`.
fn remove_listed(headers: &mut HeaderMap, listed: &[HeaderName], skip: u32) {
    let mut hit = 0u32;
    for name in headers.keys() {
        if let Some(i) = listed.iter().position(|l| l == name) {
            hit |= 1 << i;
        }
    }
    hit &= !skip;
    while hit != 0 {
        let i = hit.trailing_zeros() as usize;
        hit &= hit - 1;
        headers.remove(&listed[i]);
    }
}

/// What [`prepare_request_headers`] removes: the hop-by-hop list (in the
/// same order as [`HOP_BY_HOP`]), then every header that carries a client
/// credential, then `Host`, `Content-Length` and `Expect`.
///
/// The credential headers are those a client, or a platform in front of the
/// gateway, can attach: the two the gateway checks (`Authorization`,
/// `api-key`), `Proxy-Authorization` (meant for a forward proxy, and RFC
/// 9110 §11.7.2 says a proxy consumes it), `Cookie` (a session with whatever
/// serves the gateway's host), the APIM subscription key and the `x-api-key`
/// some SDKs send. An instance only ever sees the gateway's own credential.
static REQUEST_DROPPED: [HeaderName; 16] = [
    header::CONNECTION,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    HeaderName::from_static("ocp-apim-subscription-key"),
    HeaderName::from_static("x-api-key"),
    header::HOST,
    header::CONTENT_LENGTH,
    // The body is already read in full, so `Expect: 100-continue` was
    // answered by us and means nothing upstream.
    header::EXPECT,
];

/// Prefixes of headers that App Service / Container Apps authentication
/// ("Easy Auth") injects in front of the gateway: the caller's Entra tokens
/// (`x-ms-token-aad-access-token`, `x-ms-token-aad-id-token`, ...) and its
/// identity (`x-ms-client-principal`, `-id`, `-name`, `-idp`). They belong to
/// the gateway's host and must not reach an instance.
const PLATFORM_CREDENTIAL_PREFIXES: [&str; 2] = ["x-ms-token-", "x-ms-client-principal"];

/// The WebSocket subprotocol prefix OpenAI's browser clients use to carry a
/// key (`openai-insecure-api-key.<key>`), since browsers cannot set headers
/// on a WebSocket handshake.
const SUBPROTOCOL_KEY_PREFIX: &str = "openai-insecure-api-key.";

/// Prepares the client's headers once per request, for every attempt:
/// removes credentials, `Host`, hop-by-hop headers, `Expect` and
/// `Content-Length` (the upstream body's length is set from the buffered
/// body), and sets
/// `x-ms-client-request-id`.
pub fn prepare_request_headers(headers: &mut HeaderMap, request_id: &HeaderValue, websocket: bool) {
    remove_connection_named(headers, websocket);
    // With a WebSocket upgrade, Connection and Upgrade stay (set to
    // exactly `upgrade` below).
    let skip = if websocket { 0b11 } else { 0 };
    remove_listed(headers, &REQUEST_DROPPED, skip);
    remove_platform_credentials(headers);
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        strip_subprotocol_keys(headers);
    }
    headers.insert(CLIENT_REQUEST_ID.clone(), request_id.clone());
}

/// Removes every header named by [`PLATFORM_CREDENTIAL_PREFIXES`]. One pass
/// over the names; nothing is allocated unless one is present.
fn remove_platform_credentials(headers: &mut HeaderMap) {
    let is_platform = |n: &HeaderName| {
        PLATFORM_CREDENTIAL_PREFIXES
            .iter()
            .any(|p| n.as_str().starts_with(p))
    };
    if !headers.keys().any(is_platform) {
        return;
    }
    let named: Vec<HeaderName> = headers.keys().filter(|n| is_platform(n)).cloned().collect();
    for name in named {
        headers.remove(&name);
    }
}

/// Drops `openai-insecure-api-key.*` entries from `Sec-WebSocket-Protocol`,
/// keeping the others in order (the instance echoes one of them back); the
/// header goes when nothing else is left.
fn strip_subprotocol_keys(headers: &mut HeaderMap) {
    let has_key = |v: &HeaderValue| {
        v.as_bytes().split(|&c| c == b',').any(|p| {
            p.trim_ascii()
                .starts_with(SUBPROTOCOL_KEY_PREFIX.as_bytes())
        })
    };
    if !headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(has_key)
    {
        return;
    }
    let kept: Vec<Vec<u8>> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&c| c == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty() && !p.starts_with(SUBPROTOCOL_KEY_PREFIX.as_bytes()))
        .map(<[u8]>::to_vec)
        .collect();
    headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(&kept.join(&b", "[..]))
    {
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
}

/// The per-attempt header map: the prepared headers plus this instance's
/// `Host` and credential: `bearer` (`Bearer <token>` of an Entra ID
/// credential) as `Authorization`, else the instance's `api-key`.
pub fn attempt_headers(
    prepared: &HeaderMap,
    backend: &Backend,
    bearer: Option<&HeaderValue>,
) -> HeaderMap {
    let mut h = prepared.clone();
    h.insert(header::HOST, backend.host.clone());
    match (bearer, &backend.api_key) {
        (Some(b), _) => {
            h.insert(header::AUTHORIZATION, b.clone());
        }
        (None, Some(k)) => {
            h.insert(API_KEY.clone(), k.clone());
        }
        (None, None) => {}
    }
    h
}

/// The upstream URI for `backend`: base URL + path (prefixed, deployment
/// segment renamed) + `?query`. The scheme and authority are the
/// backend's, parsed once at start-up; only the path and query are checked
/// here.
///
/// # Errors
/// When the path and query are not valid in a URI (they cannot be for a
/// path that passed routing, but the parser has the last word).
pub fn upstream_uri(
    backend: &Backend,
    path: &str,
    query: Option<&str>,
    route: &Route,
    backend_deployment: Option<&str>,
) -> Result<Uri, http::Error> {
    let mut s = String::with_capacity(
        backend.prefix.len() + path.len() + 8 + query.map_or(0, |q| q.len() + 1) + 16,
    );
    s.push_str(&backend.prefix);
    if route.add_prefix {
        s.push_str("/openai");
    }
    match (
        &route.path_span,
        backend_deployment,
        route.deployment.as_deref(),
    ) {
        (Some(span), Some(to), Some(from)) if to != from => {
            s.push_str(&path[..span.start]);
            s.push_str(to);
            s.push_str(&path[span.end..]);
        }
        _ => s.push_str(path),
    }
    if let Some(q) = query {
        let rename = match (
            &route.query_span,
            backend_deployment,
            route.deployment.as_deref(),
        ) {
            (Some(span), Some(to), Some(from)) if to != from && span.end <= q.len() => {
                Some((span.clone(), to))
            }
            _ => None,
        };
        push_query(&mut s, q, rename);
    }
    let path_and_query = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(s))?;
    Ok(Uri::from_parts({
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(backend.scheme.clone());
        parts.authority = Some(backend.authority.clone());
        parts.path_and_query = Some(path_and_query);
        parts
    })?)
}

/// Appends `?query` to `s` with every `api-key` parameter removed and, with
/// `rename`, the bytes at that span of `q` replaced. Every other byte of the
/// query is kept, separators included. Nothing (not even `?`) is appended
/// when the only parameters were keys.
///
/// A client key must never reach an instance: Azure's realtime endpoint
/// takes a key as a query parameter, so one placed there by a client would
/// be read by the instance (and sit in its logs).
fn push_query(s: &mut String, q: &str, rename: Option<(std::ops::Range<usize>, &str)>) {
    let push_segment = |s: &mut String, seg: &str, seg_start: usize| match &rename {
        Some((span, to)) if span.start >= seg_start && span.end <= seg_start + seg.len() => {
            s.push_str(&seg[..span.start - seg_start]);
            s.push_str(to);
            s.push_str(&seg[span.end - seg_start..]);
        }
        _ => s.push_str(seg),
    };
    // A parameter named `api-key` has a `k` in its name, as a letter or
    // percent-encoded (`%6B`, `%4B`): a query without `k`, `K` or `%` (the
    // usual `api-version=...`) has none, found in one pass.
    let may_have_key = memchr::memchr3(b'k', b'K', b'%', q.as_bytes()).is_some();
    if !may_have_key || !q.split('&').any(is_api_key_param) {
        s.push('?');
        push_segment(s, q, 0);
        return;
    }
    let mut first = true;
    let mut pos = 0;
    for seg in q.split('&') {
        let seg_start = pos;
        pos += seg.len() + 1;
        if is_api_key_param(seg) {
            continue;
        }
        s.push(if first { '?' } else { '&' });
        first = false;
        push_segment(s, seg, seg_start);
    }
}

/// Whether a query segment (`name=value` or `name`) names `api-key`,
/// compared as a server would read it: percent-decoded, ASCII case
/// ignored.
fn is_api_key_param(seg: &str) -> bool {
    const NAME: &[u8] = b"api-key";
    let name = seg.split('=').next().unwrap_or_default().as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < name.len() {
        let c = match (name[i], name.get(i + 1..i + 3)) {
            (b'%', Some(&[h, l])) => match (hex(h), hex(l)) {
                (Some(h), Some(l)) => {
                    i += 3;
                    h << 4 | l
                }
                _ => return false,
            },
            (c, _) => {
                i += 1;
                c
            }
        };
        if n >= NAME.len() || !c.eq_ignore_ascii_case(&NAME[n]) {
            return false;
        }
        n += 1;
    }
    n == NAME.len()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The upstream body for an attempt: empty for GET and HEAD; the client's
/// bytes with only the `model` value replaced when the instance maps the
/// name; otherwise the client's bytes, shared, not copied.
pub fn upstream_body(
    method: &Method,
    body: &Bytes,
    route: &Route,
    backend_deployment: Option<&str>,
) -> Bytes {
    if *method == Method::GET || *method == Method::HEAD {
        return Bytes::new();
    }
    match (
        &route.model_span,
        backend_deployment,
        route.deployment.as_deref(),
    ) {
        (Some(span), Some(to), Some(from)) if to != from && span.end <= body.len() => {
            splice_json_string(body, span.clone(), to)
        }
        _ => body.clone(),
    }
}

/// Replaces the contents of a JSON string (`span`, between its quotes) by
/// `value`, escaped as JSON requires.
fn splice_json_string(body: &Bytes, span: std::ops::Range<usize>, value: &str) -> Bytes {
    let escaped;
    let value = if value.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        // `to_string` of a `&str` always succeeds; keep the raw value if not.
        escaped = serde_json::to_string(value).unwrap_or_default();
        escaped
            .get(1..escaped.len().saturating_sub(1))
            .unwrap_or(value)
    } else {
        value
    };
    let mut out = BytesMut::with_capacity(body.len() - span.len() + value.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BreakerConfig, Config};
    use crate::route::{apply_body_model, classify};

    fn backend(url: &str) -> Backend {
        let doc =
            format!(r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"backend-key"}}]}}"#);
        let c = Config::from_json(&doc).unwrap();
        Backend::new(0, c.instances[0].clone(), &BreakerConfig::default()).unwrap()
    }

    #[test]
    fn builds_the_same_uri_as_parsing_the_whole_string() {
        let p = "/openai/deployments/gpt-4o/chat/completions";
        let r = classify(&Method::POST, p).unwrap();
        for url in [
            "https://my-res.openai.azure.com",
            "https://apim.example.com/aoai/",
            "http://127.0.0.1:9000",
            "http://[::1]:8080/x/y",
            "https://EXAMPLE.com:443",
        ] {
            let b = backend(url);
            for q in [None, Some("api-version=2024-10-21&x=%2F"), Some("")] {
                let u = upstream_uri(&b, p, q, &r, Some("gpt-4o")).unwrap();
                let whole: Uri = u.to_string().parse().unwrap();
                assert_eq!(u, whole, "{url} {q:?}");
                assert_eq!(u.scheme(), whole.scheme());
                assert_eq!(u.authority(), whole.authority());
                assert_eq!(u.path_and_query(), whole.path_and_query());
                assert!(u.to_string().starts_with(&b.base), "{u} {url}");
            }
        }
    }

    #[test]
    fn keeps_the_base_path_prefix_and_query() {
        let b = backend("https://apim.example.com/aoai/");
        let p = "/openai/deployments/gpt-4o/chat/completions";
        let r = classify(&Method::POST, p).unwrap();
        let u = upstream_uri(
            &b,
            p,
            Some("api-version=2024-10-21&x=%2F"),
            &r,
            Some("gpt-4o"),
        )
        .unwrap();
        assert_eq!(
            u.to_string(),
            "https://apim.example.com/aoai/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&x=%2F"
        );
    }

    #[test]
    fn strips_api_key_query_parameters_and_keeps_the_rest() {
        let b = backend("http://127.0.0.1:9000");
        let p = "/openai/deployments/gpt-4o/chat/completions";
        let r = classify(&Method::POST, p).unwrap();
        let up = |q: &str| {
            upstream_uri(&b, p, Some(q), &r, Some("gpt-4o"))
                .unwrap()
                .to_string()
        };
        let base = "http://127.0.0.1:9000/openai/deployments/gpt-4o/chat/completions";
        assert_eq!(
            up("api-version=1&api-key=secret&x=%2F&&y"),
            format!("{base}?api-version=1&x=%2F&&y")
        );
        assert_eq!(up("api-key=secret"), base);
        assert_eq!(
            up("API-Key=a&api%2Dkey=b&api-key&z=1"),
            format!("{base}?z=1")
        );
        assert_eq!(
            up("api-keys=1&xapi-key=2&api-key2=3&x=api-key"),
            format!("{base}?api-keys=1&xapi-key=2&api-key2=3&x=api-key")
        );
        assert_eq!(up(""), format!("{base}?"));
        // The `k` of the name, percent-encoded in either case.
        assert_eq!(
            up("API-%4bEY=a&api-%6Bey=b&api-version=1"),
            format!("{base}?api-version=1")
        );
        assert_eq!(
            up("api-version=1&x=%41"),
            format!("{base}?api-version=1&x=%41")
        );
    }

    #[test]
    fn renames_the_realtime_deployment_after_stripping_a_key() {
        let b = backend("http://127.0.0.1:9000");
        let p = "/openai/realtime";
        let q = "api-key=secret&api-version=1&deployment=rt&x=1";
        let mut r = classify(&Method::GET, p).unwrap();
        crate::route::apply_query_deployment(&mut r, Some(q)).unwrap();
        let u = upstream_uri(&b, p, Some(q), &r, Some("rt-ptu")).unwrap();
        assert_eq!(
            u.to_string(),
            "http://127.0.0.1:9000/openai/realtime?api-version=1&deployment=rt-ptu&x=1"
        );
    }

    #[test]
    fn renames_the_deployment_segment_and_adds_the_prefix() {
        let b = backend("http://127.0.0.1:9000");
        let p = "/deployments/gpt-4o/chat/completions";
        let r = classify(&Method::POST, p).unwrap();
        let u = upstream_uri(&b, p, None, &r, Some("gpt-4o-ptu")).unwrap();
        assert_eq!(
            u.to_string(),
            "http://127.0.0.1:9000/openai/deployments/gpt-4o-ptu/chat/completions"
        );
        assert_eq!(b.host, "127.0.0.1:9000");
    }

    #[test]
    fn splices_only_the_model_value() {
        let body = Bytes::from_static(
            br#"{ "messages":[{"role":"user","content":"model"}],  "model":"gpt-4o" ,"n":1}"#,
        );
        let mut r = classify(&Method::POST, "/openai/v1/chat/completions").unwrap();
        apply_body_model(&mut r, &body).unwrap();
        let out = upstream_body(&Method::POST, &body, &r, Some("gpt-4o-ptu"));
        assert_eq!(
            &out[..],
            &br#"{ "messages":[{"role":"user","content":"model"}],  "model":"gpt-4o-ptu" ,"n":1}"#
                [..]
        );
        // Unmapped: the very same bytes.
        let same = upstream_body(&Method::POST, &body, &r, Some("gpt-4o"));
        assert_eq!(same.as_ptr(), body.as_ptr());
    }

    #[test]
    fn get_and_head_send_no_body() {
        let body = Bytes::from_static(b"x");
        let r = classify(&Method::GET, "/openai/models").unwrap();
        assert!(upstream_body(&Method::GET, &body, &r, None).is_empty());
        assert!(upstream_body(&Method::HEAD, &body, &r, None).is_empty());
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("x-keep", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn keeps_a_websocket_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_websocket_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn prepares_a_websocket_handshake_keeping_only_the_upgrade_hop_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("api-key", "client"),
            ("expect", "100-continue"),
            ("host", "gateway"),
            ("sec-websocket-key", "abc"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        prepare_request_headers(&mut h, &HeaderValue::from_static("rid"), true);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "connection",
                "sec-websocket-key",
                "upgrade",
                "x-ms-client-request-id"
            ]
        );
        assert_eq!(h["connection"], "upgrade");
        let mut plain = h.clone();
        prepare_request_headers(&mut plain, &HeaderValue::from_static("rid"), false);
        assert!(plain.get("connection").is_none() && plain.get("upgrade").is_none());
    }

    #[test]
    fn removes_client_credentials_and_sets_the_instance_key() {
        let b = backend("http://127.0.0.1:9000");
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer client"));
        h.insert("api-key", HeaderValue::from_static("client"));
        h.insert("host", HeaderValue::from_static("gateway"));
        h.insert("content-length", HeaderValue::from_static("5"));
        prepare_request_headers(&mut h, &HeaderValue::from_static("rid"), false);
        let a = attempt_headers(&h, &b, None);
        assert!(a.get("authorization").is_none());
        assert_eq!(a["api-key"], "backend-key");
        assert!(a["api-key"].is_sensitive());
        assert_eq!(a["host"], "127.0.0.1:9000");
        assert_eq!(a["x-ms-client-request-id"], "rid");
        assert!(a.get("content-length").is_none());
    }

    #[test]
    fn removes_every_client_credential_header() {
        let b = backend("http://127.0.0.1:9000");
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client"),
            ("api-key", "client"),
            ("proxy-authorization", "Basic dXNlcjpwdw=="),
            ("cookie", "session=abc"),
            ("ocp-apim-subscription-key", "apim"),
            ("x-api-key", "other"),
            ("x-ms-token-aad-access-token", "eyJ"),
            ("x-ms-token-aad-id-token", "eyJ"),
            ("x-ms-client-principal", "e30="),
            ("x-ms-client-principal-id", "oid"),
            ("x-ms-client-principal-name", "me@example.com"),
            ("x-ms-useragent", "AzureOpenAI/1.0"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        prepare_request_headers(&mut h, &HeaderValue::from_static("rid"), false);
        let a = attempt_headers(&h, &b, None);
        let mut names: Vec<&str> = a.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "api-key",
                "host",
                "x-ms-client-request-id",
                "x-ms-useragent"
            ]
        );
        assert_eq!(a["api-key"], "backend-key");
    }

    #[test]
    fn drops_a_key_carried_as_a_websocket_subprotocol() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(
                "realtime, openai-insecure-api-key.sk-123, openai-beta.realtime-v1",
            ),
        );
        prepare_request_headers(&mut h, &HeaderValue::from_static("rid"), true);
        assert_eq!(
            h["sec-websocket-protocol"],
            "realtime, openai-beta.realtime-v1"
        );
        let mut only = HeaderMap::new();
        only.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("openai-insecure-api-key.sk-123"),
        );
        prepare_request_headers(&mut only, &HeaderValue::from_static("rid"), true);
        assert!(only.get("sec-websocket-protocol").is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        #[test]
        fn the_model_splice_changes_nothing_else(
            before in proptest::collection::btree_map("[a-z]{1,6}", "[ -~]{0,12}", 0..4),
            after in proptest::collection::btree_map("[a-z]{1,6}", 0i64..1000, 0..4),
            model in "[a-zA-Z0-9._-]{1,16}",
            mapped in "[a-zA-Z0-9._\"\\\\-]{1,16}",
            spaces in "[ \n\t]{0,3}",
        ) {
            // `model` first, last or in between, with odd spacing.
            let mut doc = String::from("{");
            for (k, v) in &before {
                if k == "model" { continue; }
                doc.push_str(&format!("{}:{spaces}{},", serde_json::to_string(k).unwrap(), serde_json::to_string(v).unwrap()));
            }
            doc.push_str(&format!("\"model\"{spaces}:{spaces}{}", serde_json::to_string(&model).unwrap()));
            for (k, v) in &after {
                if k == "model" || before.contains_key(k) { continue; }
                doc.push_str(&format!(",{spaces}{}:{v}", serde_json::to_string(k).unwrap()));
            }
            doc.push('}');
            let body = Bytes::from(doc.clone());
            let mut r = classify(&Method::POST, "/openai/v1/chat/completions").unwrap();
            apply_body_model(&mut r, &body).unwrap();
            let out = upstream_body(&Method::POST, &body, &r, Some(&mapped));
            let span = r.model_span.clone().unwrap();
            let mut original: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let rewritten: serde_json::Value = serde_json::from_slice(&out).unwrap();
            original["model"] = serde_json::Value::String(mapped.clone());
            proptest::prop_assert_eq!(original, rewritten);
            proptest::prop_assert_eq!(&out[..span.start], &body[..span.start]);
            let tail = body.len() - span.end;
            proptest::prop_assert_eq!(&out[out.len() - tail..], &body[span.end..]);
        }
    }
}
