//! Fuzzes the `deployments` map of the configuration against the upstream
//! URL: any client-to-instance deployment mapping that the configuration
//! parser accepts must produce a valid upstream URI for a request to that
//! deployment, or every such request would fail at run time.
#![no_main]

use aoai_lb::backend::Backend;
use aoai_lb::config::{BreakerConfig, Config};
use aoai_lb::rewrite::upstream_uri;
use aoai_lb::route::classify;
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Input: the instance's name for the client deployment `gpt-4o`.
    let Ok(to) = std::str::from_utf8(data) else {
        return;
    };
    let doc = serde_json::json!({
        "instances": [{
            "name": "a",
            "url": "http://127.0.0.1:9/base",
            "api_key": "k",
            "deployments": { "gpt-4o": to },
        }]
    });
    let Ok(config) = Config::from_json(&doc.to_string()) else {
        return;
    };
    let instance = config.instances[0].clone();
    let mapped = instance.backend_deployment("gpt-4o").map(str::to_owned);
    let b = Backend::new(0, instance, &BreakerConfig::default()).unwrap();
    let path = "/openai/deployments/gpt-4o/chat/completions";
    let route = classify(&Method::POST, path).unwrap();
    if let Err(e) = upstream_uri(
        &b,
        path,
        Some("api-version=2024-10-21"),
        &route,
        mapped.as_deref(),
    ) {
        panic!("accepted deployment name {to:?} gives an invalid upstream URI: {e}");
    }
});
