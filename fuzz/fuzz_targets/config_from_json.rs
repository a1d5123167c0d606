//! Fuzzes the configuration parser: any text must give a `Config` or a
//! one-line `field: reason` error, never a panic, and never echo a key.
#![no_main]

use aoai_lb::config::{BackendCredential, Config};
use libfuzzer_sys::fuzz_target;

/// Keys of at least this length that appear once in the document must not be
/// echoed; shorter ones collide with ordinary words in messages.
const MIN_KEY_LEN: usize = 6;

/// `instances[*].api_key` strings of a document that parses as JSON.
fn keys(text: &str) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    doc.get("instances")
        .and_then(|v| v.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|i| i.get("api_key").and_then(|k| k.as_str()))
                .filter(|k| k.len() >= MIN_KEY_LEN && text.matches(*k).count() == 1)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `key` shows up in the output (an error line or a `Debug` dump)
/// because the output's own wording contains it, not because the value was
/// echoed: a key such as `priority` is also a field name that an "expected
/// one of" list or a `Debug` dump names. The test: the same document with the
/// key's only occurrence masked still gives output that contains it.
fn in_fixed_wording(text: &str, key: &str) -> bool {
    let masked = text.replacen(key, &"#".repeat(key.len()), 1);
    match Config::from_json(&masked) {
        Ok(config) => format!("{config:?}").contains(key),
        Err(e) => e.to_string().contains(key),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let keys = keys(text);
    match Config::from_json(text) {
        Ok(config) => {
            assert!(!config.instances.is_empty());
            for i in &config.instances {
                assert!(i.weight.is_finite() && i.weight > 0.0);
                if let BackendCredential::ApiKey(key) = &i.credential {
                    assert!(!key.is_empty());
                }
            }
            assert!(config.cooldown.max_ms >= 1);
            assert!(config.cooldown.default_ms <= config.cooldown.max_ms);
            let shown = format!("{config:?}");
            for k in &keys {
                if shown.contains(k.as_str()) && !in_fixed_wording(text, k) {
                    panic!("Debug of Config shows a key");
                }
            }
        }
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "error is not one line: {line:?}");
            for k in &keys {
                if line.contains(k.as_str()) && !in_fixed_wording(text, k) {
                    panic!("error echoes a key: {line:?}");
                }
            }
        }
    }
});
