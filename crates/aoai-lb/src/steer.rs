//! Rate-limit-aware routing: the glue between the lanes' predictions
//! ([`crate::lane`]), the selector ([`crate::select`]) and the failover
//! loop ([`crate::send`]).
//!
//! Owns the request's Azure-style estimate for steering ([`estimate`]),
//! reading Azure's rate-limit headers into a [`Reading`], the lane of a
//! (backend, deployment) pair, the steering metrics
//! (`aoai_lb_steer_skips_total{instance,reason}`,
//! `aoai_lb_lane_remaining_tokens{instance,deployment}`) and the lane rows
//! of `/admin/backends`.
//!
//! Switched by `routing.rate_limit_aware` (default on); off, none of this
//! runs and selection is exactly priority + least-loaded.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, StatusCode};
use serde::Serialize;

use crate::backend::{Backend, Unavailable};
use crate::lane::{Headroom, Lane, LaneLimits, Prediction, Reading, SkipReason, Throttle};
use crate::limits::{Caps, output_allowance};
use crate::log::InstanceName;
use crate::select::HealthView;

/// Output tokens assumed when a request sets no `max_tokens`,
/// `max_completion_tokens` or `max_output_tokens`. Azure reserves the
/// model's largest output then; 4096 is the common cap of current chat
/// models, the same as the clients' default
/// ([`crate::clients::DEFAULT_MAX_TOKENS`]).
pub const DEFAULT_MAX_TOKENS: u64 = crate::clients::DEFAULT_MAX_TOKENS;

/// Prometheus name: predicted tokens left on a lane (refreshed at each
/// scrape).
pub const LANE_REMAINING_TOKENS: &str = "aoai_lb_lane_remaining_tokens";
/// Prometheus name: lanes skipped for lack of predicted room.
pub const STEER_SKIPS_TOTAL: &str = "aoai_lb_steer_skips_total";

/// The estimate Azure reserves for a request, as Azure makes it: the
/// prompt by characters, a quarter of the characters of its text
/// (message contents, tool-call arguments, `prompt`, `input`,
/// `instructions`; not roles, names or the JSON around them) plus one
/// per token of a token array and [`IMAGE_TOKENS`] per image part, at
/// least 1; plus the most it may generate
/// ([`crate::limits::output_allowance`] with [`DEFAULT_MAX_TOKENS`]).
/// Embeddings generate nothing. `caps` is the body as the pipeline parsed
/// it once for the request; `None` (not a JSON object) reserves 0 (it
/// still counts as a request).
pub fn estimate(path: &str, caps: Option<&Caps>) -> u64 {
    let Some(caps) = caps else {
        return 0;
    };
    let mut text = Text::default();
    for v in [
        &caps.messages,
        &caps.prompt,
        &caps.input,
        &caps.instructions,
    ]
    .into_iter()
    .flatten()
    {
        text.add(v, 0);
    }
    let prompt = (text.chars.div_ceil(4) + text.tokens).max(1);
    if crate::usage::Endpoint::from_path(path) == Some(crate::usage::Endpoint::Embeddings) {
        return prompt;
    }
    prompt.saturating_add(output_allowance(caps, DEFAULT_MAX_TOKENS))
}

/// Tokens counted for an image part in the estimate (one low-detail tile,
/// as the tokenizer estimate counts it).
pub const IMAGE_TOKENS: u64 = crate::usage::estimate::IMAGE_TOKENS;

/// Nesting followed when counting text (deeper parts are ignored).
const MAX_TEXT_DEPTH: usize = 16;

/// Text of a prompt, for the character-based estimate.
#[derive(Default)]
struct Text {
    chars: u64,
    tokens: u64,
}

impl Text {
    fn add(&mut self, v: &serde_json::Value, depth: usize) {
        use serde_json::Value;
        if depth > MAX_TEXT_DEPTH {
            return;
        }
        match v {
            Value::String(s) => self.chars += s.chars().count() as u64,
            Value::Number(_) => self.tokens += 1,
            Value::Array(items) => {
                for i in items {
                    self.add(i, depth + 1);
                }
            }
            Value::Object(o) => {
                if matches!(
                    o.get("type").and_then(Value::as_str),
                    Some("image_url" | "input_image")
                ) {
                    self.tokens += IMAGE_TOKENS;
                    return;
                }
                for (k, v) in o {
                    if matches!(
                        k.as_str(),
                        "content"
                            | "text"
                            | "arguments"
                            | "input"
                            | "output"
                            | "tool_calls"
                            | "function"
                    ) {
                        self.add(v, depth + 1);
                    }
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }
}

// The headers [`reading`] looks at on every response, as names made once:
// a lookup by `&str` validates and lowercases the name before hashing it.
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static UTILIZATION: HeaderName = HeaderName::from_static("azure-openai-deployment-utilization");
static POLICY_ID: HeaderName = HeaderName::from_static("policy-id");

/// Reads Azure's rate-limit headers. Absent, unparsable or negative
/// values (the Responses API sends `-1`) are unknown. On a 429,
/// `policy-id` says which budget ran out (`…-Token` or `…-Call`; neither
/// or absent: both), and `retry_after_ms` is the cooldown already chosen
/// for it.
pub fn reading(headers: &HeaderMap, status: StatusCode, retry_after_ms: u64) -> Reading {
    let num = |name: &HeaderName| -> Option<u64> {
        let v = headers.get(name)?.to_str().ok()?.trim();
        let f: f64 = v.parse().ok()?;
        (f.is_finite() && f >= 0.0).then_some(f as u64)
    };
    let utilization = headers
        .get(&UTILIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().trim_end_matches('%').trim().parse::<f64>().ok())
        .filter(|u| u.is_finite() && *u >= 0.0);
    let throttled = (status == StatusCode::TOO_MANY_REQUESTS).then(|| {
        let policy = headers
            .get(&POLICY_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let tokens = policy.ends_with("-token");
        let requests = policy.ends_with("-call");
        let known = tokens || requests;
        Throttle {
            tokens: tokens || !known,
            requests: requests || !known,
            retry_after_ms,
        }
    });
    Reading {
        remaining_tokens: num(&REMAINING_TOKENS),
        remaining_requests: num(&REMAINING_REQUESTS),
        limit_tokens: num(&LIMIT_TOKENS),
        limit_requests: num(&LIMIT_REQUESTS),
        utilization,
        throttled,
    }
}

/// The lane for client-facing deployment `dep` on `backend`, with its
/// configured limits; `None` when the instance does not serve `dep` or
/// has no room for another lane.
pub fn lane(backend: &Backend, dep: &str) -> Option<(Arc<Lane>, LaneLimits)> {
    let upstream = backend.config.backend_deployment(dep)?;
    let lane = backend.lanes().get(upstream)?;
    let limits = backend
        .config
        .deployments
        .as_ref()
        .map(|d| d.limits(upstream))
        .unwrap_or_default();
    Some((lane, limits))
}

/// Whether `backend` has room for a request of `estimate` tokens on `dep`
/// at `now`; `None` (no opinion) when there is no lane.
pub fn headroom(backend: &Backend, dep: &str, estimate: u64, now: u64) -> Option<Headroom> {
    let (lane, limits) = lane(backend, dep)?;
    Some(lane.with(|s| s.headroom(now, estimate, &limits)))
}

/// When no candidate can take the request now — each is cooling down
/// after a 429, or has no predicted room and its shortage was confirmed
/// by a 429 within the last minute (so it is no fallback) — the time
/// (ms from `now`) until the first one is free or predicted to have room.
/// A lane that has room again (a reservation left since the pick) counts
/// as free in 1 ms. `None` when some candidate could still be tried as a
/// fallback, has an open breaker or no token (or none serves).
pub fn out_of_room_wait(
    health: &dyn HealthView,
    backends: &[Arc<Backend>],
    serves: impl Fn(&Backend) -> bool,
    dep: &str,
    estimate: u64,
    now: u64,
) -> Option<u64> {
    let mut first: Option<u64> = None;
    for b in backends.iter().filter(|b| serves(b)) {
        let wait = match health.check(b, now) {
            Err(Unavailable::Cooling(until)) => until.saturating_sub(now).max(1),
            Err(Unavailable::BreakerOpen | Unavailable::NoToken) => return None,
            Ok(()) => {
                let (lane, limits) = lane(b, dep)?;
                let wait = lane.with(|s| {
                    let h = s.headroom(now, estimate, &limits);
                    if h.fits.is_ok() {
                        Some(1)
                    } else {
                        (!h.fallback).then(|| s.time_until_room(now, estimate, &limits))
                    }
                });
                wait?
            }
        };
        first = Some(first.map_or(wait, |f| f.min(wait)));
    }
    first
}

/// Counts one skip in `aoai_lb_steer_skips_total{instance,reason}`.
pub fn count_skip(backend: &Backend, reason: SkipReason) {
    metrics::counter!(STEER_SKIPS_TOTAL, "instance" => backend.name().to_owned(), "reason" => reason.as_str())
        .increment(1);
}

/// A lane skipped for one request, for the access log.
#[derive(Clone, Serialize)]
pub struct Skip {
    /// The instance.
    pub instance: InstanceName,
    /// `tokens`, `requests` or `utilization`.
    pub reason: &'static str,
}

/// One lane in `/admin/backends`.
#[derive(Debug, Clone, Serialize)]
pub struct LaneStatus {
    /// The upstream deployment name.
    pub deployment: String,
    /// The prediction now.
    #[serde(flatten)]
    pub prediction: Prediction,
}

/// Every lane of `backend`, predicted at `now`.
pub fn lane_status(backend: &Backend, now: u64) -> Vec<LaneStatus> {
    backend
        .lanes()
        .all()
        .into_iter()
        .map(|(deployment, lane)| {
            let limits = backend
                .config
                .deployments
                .as_ref()
                .map(|d| d.limits(&deployment))
                .unwrap_or_default();
            let prediction = lane.with(|s| s.predict(now, &limits));
            LaneStatus {
                deployment,
                prediction,
            }
        })
        .collect()
}

/// Sets `aoai_lb_lane_remaining_tokens` for every lane of `backends`
/// (called at each scrape, since the prediction moves with time). Only
/// instances with a `deployments` map export it: elsewhere the deployment
/// name is the client's choice, which metric labels never carry.
pub fn refresh_gauges(backends: &[Arc<Backend>], now: u64) {
    for b in backends.iter().filter(|b| b.config.deployments.is_some()) {
        for l in lane_status(b, now) {
            if let Some(r) = l.prediction.remaining_tokens {
                metrics::gauge!(LANE_REMAINING_TOKENS, "instance" => b.name().to_owned(), "deployment" => l.deployment)
                    .set(r as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    const CHAT: &str = "/openai/deployments/d/chat/completions";

    fn estimate(path: &str, body: &[u8]) -> u64 {
        super::estimate(path, Caps::parse(body).as_ref())
    }

    #[test]
    fn estimates_like_azure_prompt_characters_plus_max_tokens_times_n() {
        // 11 characters of text: 3 tokens; roles and framing do not count.
        let body = br#"{"messages":[{"role":"system","content":"be"},{"role":"user","content":"brief pls"}],"max_tokens":100,"n":2}"#;
        assert_eq!(estimate(CHAT, body), 3 + 200);
        let body = br#"{"messages":[]}"#;
        assert_eq!(estimate(CHAT, body), 1 + DEFAULT_MAX_TOKENS);
        let body = br#"{"input":"some text"}"#;
        assert_eq!(estimate("/openai/deployments/d/embeddings", body), 3);
        let body = br#"{"input":[[1,2,3],[4]]}"#;
        assert_eq!(estimate("/openai/deployments/d/embeddings", body), 4);
        assert_eq!(
            estimate("/openai/deployments/d/audio/transcriptions", b"--x"),
            0
        );
    }

    #[test]
    fn counts_text_parts_tool_arguments_and_images_but_not_image_data() {
        let data = "A".repeat(40_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"abcdefgh"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{data}"}}}}]}},{{"role":"assistant","content":null,"tool_calls":[{{"id":"c1","type":"function","function":{{"name":"f","arguments":"{{}}1234"}}}}]}}],"max_completion_tokens":10}}"#
        );
        // "abcdefgh" + "{}1234": 14 characters, 4 tokens; one image.
        assert_eq!(estimate(CHAT, body.as_bytes()), 4 + IMAGE_TOKENS + 10);
        let body = br#"{"model":"m","instructions":"abcd","input":[{"role":"user","content":[{"type":"input_text","text":"efgh"}]}],"max_output_tokens":5}"#;
        assert_eq!(estimate("/openai/v1/responses", body), 2 + 5);
    }

    #[test]
    fn reads_remaining_limits_and_utilization_and_ignores_negatives() {
        let r = reading(
            &h(&[
                ("x-ratelimit-remaining-tokens", "9000"),
                ("x-ratelimit-remaining-requests", "17"),
                ("x-ratelimit-limit-tokens", "-1"),
                ("x-ratelimit-limit-requests", "20"),
                ("azure-openai-deployment-utilization", "73.5%"),
            ]),
            StatusCode::OK,
            0,
        );
        assert_eq!(r.remaining_tokens, Some(9000));
        assert_eq!(r.remaining_requests, Some(17));
        assert_eq!(r.limit_tokens, None);
        assert_eq!(r.limit_requests, Some(20));
        assert_eq!(r.utilization, Some(73.5));
        assert_eq!(r.throttled, None);
    }

    #[test]
    fn reads_which_budget_a_429_names_in_policy_id() {
        let tok = reading(
            &h(&[("policy-id", "DeploymentRatelimit-Token")]),
            StatusCode::TOO_MANY_REQUESTS,
            5,
        );
        assert_eq!(
            tok.throttled,
            Some(Throttle {
                tokens: true,
                requests: false,
                retry_after_ms: 5
            })
        );
        let call = reading(
            &h(&[("policy-id", "DeploymentRatelimit-Call")]),
            StatusCode::TOO_MANY_REQUESTS,
            5,
        );
        assert_eq!(
            call.throttled.map(|t| (t.tokens, t.requests)),
            Some((false, true))
        );
        let none = reading(&h(&[]), StatusCode::TOO_MANY_REQUESTS, 5);
        assert_eq!(
            none.throttled.map(|t| (t.tokens, t.requests)),
            Some((true, true))
        );
    }
}
