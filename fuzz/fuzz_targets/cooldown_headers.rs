//! Fuzzes the parsing of an upstream 429's `retry-after-ms`, `retry-after`
//! (seconds or HTTP date) and `x-ratelimit-reset-*` headers into a cooldown:
//! always within [1, max_ms], never a panic, whatever the backend sends.
#![no_main]

use std::time::{Duration, SystemTime};

use aoai_lb::config::CooldownConfig;
use aoai_lb::send::cooldown_ms;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 4] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
];

fuzz_target!(|data: &[u8]| {
    // Bytes 0..8: cooldown settings and the clock; then one value per line,
    // assigned to the header names in order.
    if data.len() < 8 {
        return;
    }
    let max_ms = u64::from(u16::from_le_bytes([data[0], data[1]])).max(1) * 100;
    let default_ms = u64::from(u16::from_le_bytes([data[2], data[3]])) * 100 % (max_ms + 1);
    let now = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            u64::from(u32::from_le_bytes([data[4], data[5], data[6], data[7]])) * 8,
        );
    let cfg = CooldownConfig { default_ms, max_ms };

    let mut headers = HeaderMap::new();
    for (name, value) in NAMES.iter().zip(data[8..].split(|&b| b == b'\n')) {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.insert(*name, v);
        }
    }
    let ms = cooldown_ms(&headers, &cfg, now);
    assert!(
        (1..=max_ms).contains(&ms),
        "cooldown {ms} outside [1, {max_ms}]"
    );
    if headers.is_empty() {
        assert_eq!(ms, default_ms.max(1));
    }
});
