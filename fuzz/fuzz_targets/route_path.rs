//! Fuzzes path routing and the upstream URL built from it. Whatever path a
//! client sends, a routed request must land under the instance's base path
//! and `/openai`, with no `.`/`..` segment and the query untouched; and a
//! configuration that validated must always yield a valid upstream URI.
#![no_main]

use aoai_lb::backend::Backend;
use aoai_lb::config::{BreakerConfig, Config};
use aoai_lb::rewrite::upstream_uri;
use aoai_lb::route::{classify, percent_decode};
use http::{Method, Uri};
use libfuzzer_sys::fuzz_target;

const BASE_PATH: &str = "/base";

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

/// An instance mapping the client's deployment `from` to `to`, if the
/// configuration parser accepts that mapping.
fn backend(from: &str, to: &str) -> Option<Backend> {
    let doc = serde_json::json!({
        "instances": [{
            "name": "a",
            "url": format!("http://127.0.0.1:9{BASE_PATH}/"),
            "api_key": "backend-key",
            "deployments": { from: to },
        }]
    });
    let config = Config::from_json(&doc.to_string()).ok()?;
    let instance = config.instances.into_iter().next()?;
    Backend::new(0, instance, &BreakerConfig::default()).ok()
}

fn plain_backend() -> Backend {
    let doc = format!(
        r#"{{"instances":[{{"name":"a","url":"http://127.0.0.1:9{BASE_PATH}","api_key":"k"}}]}}"#
    );
    let config = Config::from_json(&doc).unwrap();
    Backend::new(0, config.instances[0].clone(), &BreakerConfig::default()).unwrap()
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: method. Then `target` [\0 backend-deployment-name].
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let (target, to) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    // Only request targets that the HTTP layer would have accepted.
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    if uri.scheme().is_some() || !uri.path().starts_with('/') {
        return;
    }
    let (path, query) = (uri.path(), uri.query());
    let method = method(m);
    let Ok(route) = classify(&method, path) else {
        return;
    };

    // Deployment name and span agree with the path.
    if let (Some(span), Some(dep)) = (&route.path_span, &route.deployment) {
        assert_eq!(percent_decode(&path[span.clone()]).ok().as_deref(), Some(dep.as_str()));
    }

    let mapped = match (&route.deployment, to.and_then(|t| std::str::from_utf8(t).ok())) {
        (Some(from), Some(to)) => backend(from, to).map(|b| (b, to.to_owned())),
        _ => None,
    };
    let (b, to) = match mapped {
        Some((b, to)) => (b, Some(to)),
        None => (plain_backend(), None),
    };
    let up = upstream_uri(&b, path, query, &route, to.as_deref());
    let up = match up {
        Ok(u) => u,
        Err(e) => panic!("validated config and routed path gave an invalid upstream URI: {e}"),
    };
    assert_eq!(up.query(), query, "query changed");
    let up_path = up.path();
    assert!(
        up_path == "/base/openai" || up_path.starts_with("/base/openai/"),
        "upstream path {up_path:?} escapes /base/openai"
    );
    for seg in up_path.split('/') {
        let decoded = percent_decode(seg).unwrap_or_default();
        assert!(decoded != "." && decoded != "..", "dot segment reached upstream: {up_path:?}");
    }
});
