//! Fuzzes client-header handling: authentication and the sanitising done
//! before a request goes upstream. Whatever the client sends, no credential
//! and no hop-by-hop header may survive, and only the right key passes.
#![no_main]

use aoai_lb::auth::authenticate;
use aoai_lb::rewrite::{is_websocket_upgrade, prepare_request_headers};
use aoai_lb::secret::Secret;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const CLIENT_KEY: &str = "client-key-0123456789";

/// One header per line, `name: value`; lines the `http` crate refuses are
/// skipped, as hyper would have refused them before the gateway saw them.
fn parse(data: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

fuzz_target!(|data: &[u8]| {
    let headers = parse(data);
    let key = Secret::new(CLIENT_KEY);

    // Authentication passes only if some credential header carries the key.
    let carries_key = headers
        .get_all("api-key")
        .iter()
        .any(|v| v.as_bytes() == CLIENT_KEY.as_bytes())
        || headers.get_all(header::AUTHORIZATION).iter().any(|v| {
            let v = v.as_bytes();
            v.len() > 7
                && v[..7].eq_ignore_ascii_case(b"bearer ")
                && v[7..].trim_ascii() == CLIENT_KEY.as_bytes()
        });
    assert_eq!(authenticate(Some(&key), &headers).is_ok(), carries_key);
    assert!(authenticate(None, &headers).is_ok());

    let websocket = is_websocket_upgrade(&headers);
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&c| c == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();

    let mut out = headers.clone();
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    prepare_request_headers(&mut out, &id, websocket);

    for h in [header::AUTHORIZATION, header::HOST, header::CONTENT_LENGTH] {
        assert!(!out.contains_key(&h), "{h} survived");
    }
    assert!(!out.contains_key("api-key"), "client api-key survived");
    for h in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert!(!out.contains_key(h), "{h} survived");
    }
    if websocket {
        assert_eq!(
            out.get(header::CONNECTION).map(HeaderValue::as_bytes),
            Some(&b"upgrade"[..])
        );
    } else {
        assert!(!out.contains_key(header::CONNECTION));
        assert!(!out.contains_key(header::UPGRADE));
    }
    for n in &named_by_connection {
        let allowed = websocket && (*n == header::UPGRADE || *n == header::CONNECTION);
        let reinserted = matches!(n.as_str(), "x-ms-client-request-id");
        assert!(
            allowed || reinserted || !out.contains_key(n),
            "{n} named by Connection survived"
        );
    }
    let ids: Vec<_> = out.get_all("x-ms-client-request-id").iter().collect();
    assert_eq!(ids, vec![&id]);
    // Nothing else is invented: every remaining header came from the client.
    for (n, v) in &out {
        let ours = n == "x-ms-client-request-id" || (websocket && n == header::CONNECTION);
        assert!(
            ours || headers.get_all(n).iter().any(|x| x == v),
            "{n} appeared from nowhere"
        );
    }
});
