//! Fuzzes path routing and the upstream URL built from it. Whatever path a
//! client sends, a routed request must land under the instance's base path
//! and `/openai`, with no `.`/`..` segment, no encoded slash, and the query
//! untouched except that every `api-key` parameter (a client credential) is
//! removed, both when the instance renames the deployment and when not.
#![no_main]

use aoai_lb::backend::Backend;
use aoai_lb::config::{BreakerConfig, Config};
use aoai_lb::rewrite::upstream_uri;
use aoai_lb::route::{classify, percent_decode};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;

fn method(b: u8) -> Method {
    match b % 6 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::PUT,
        3 => Method::DELETE,
        4 => Method::PATCH,
        _ => Method::HEAD,
    }
}

fn backend() -> Backend {
    let doc = r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9/base/","api_key":"k"}]}"#;
    let config = Config::from_json(doc).unwrap();
    Backend::new(0, config.instances[0].clone(), &BreakerConfig::default()).unwrap()
}

/// Whether a query segment names `api-key` as a server reads it:
/// percent-decoded, ASCII case ignored.
fn names_api_key(seg: &str) -> bool {
    let name = seg.split('=').next().unwrap_or_default();
    percent_decode(name).is_ok_and(|n| n.eq_ignore_ascii_case("api-key"))
}

/// The query the instance must receive: the client's, byte for byte, less
/// its `api-key` parameters; no query at all when only keys were there.
fn expected_query(query: Option<&str>) -> Option<String> {
    let q = query?;
    if !q.split('&').any(names_api_key) {
        return Some(q.to_owned());
    }
    let kept: Vec<&str> = q.split('&').filter(|seg| !names_api_key(seg)).collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, target)) = data.split_first() else {
        return;
    };
    // Only request targets that the HTTP layer would have accepted.
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    if uri.scheme().is_some() || !uri.path().starts_with('/') {
        return;
    }
    let (path, query) = (uri.path(), uri.query());
    let Ok(route) = classify(&method(m), path) else {
        return;
    };
    if let (Some(span), Some(dep)) = (&route.path_span, &route.deployment) {
        assert_eq!(
            percent_decode(&path[span.clone()]).ok().as_deref(),
            Some(dep.as_str())
        );
    }
    let b = backend();
    for to in [None, Some("renamed-deployment")] {
        let up = match upstream_uri(&b, path, query, &route, to) {
            Ok(u) => u,
            Err(e) => panic!("routed path gave an invalid upstream URI: {e}"),
        };
        assert_eq!(
            up.query(),
            expected_query(query).as_deref(),
            "query changed beyond removing api-key"
        );
        let up_path = up.path();
        assert!(
            up_path == "/base/openai" || up_path.starts_with("/base/openai/"),
            "upstream path {up_path:?} escapes /base/openai"
        );
        let lower = up_path.to_ascii_lowercase();
        assert!(!lower.contains("%2f") && !lower.contains("%5c") && !up_path.contains('\\'));
        for seg in up_path.split('/') {
            let decoded = percent_decode(seg).unwrap_or_default();
            assert!(
                decoded != "." && decoded != "..",
                "dot segment upstream: {up_path:?}"
            );
        }
    }
});
