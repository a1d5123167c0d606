//! Azure's canonical bodies and identifiers: error bodies as Azure really sends
//! them (which differ from the spec's schema), content-filter annotations, and
//! request/object ids.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 404 for a missing `api-version` or an unknown path.
pub const RESOURCE_NOT_FOUND: &str = r#"{"error":{"code":"404","message":"Resource not found"}}"#;

/// 401 for a missing or wrong key.
pub const UNAUTHORIZED: &str = r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#;

/// 404 for a deployment the instance does not serve.
pub const DEPLOYMENT_NOT_FOUND: &str = r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}}"#;

/// 500 as Azure sends it.
pub const SERVER_ERROR: &str = r#"{"error":{"message":"The server had an error while processing your request. Sorry about that! You can retry your request, or contact us through an Azure support request at: https://go.microsoft.com/fwlink/?linkid=2213926 if you keep seeing this error. (Please include the request ID in your message.)","type":"server_error","param":null,"code":null}}"#;

/// The four harm categories, all clear, as Azure annotates prompts and choices.
pub const FILTER_RESULTS_SAFE: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;

/// 400 when the prompt trips the content filter (wire names `innererror` and
/// `content_filter_result`, not the spec's).
pub const CONTENT_FILTER: &str = r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy. Please modify your prompt and retry. To learn more about our content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":true,"severity":"high"},"violence":{"filtered":false,"severity":"safe"}}}}}"#;

/// 400 for `stream_options` on an api-version older than 2024-09-01-preview.
pub const UNRECOGNIZED_STREAM_OPTIONS: &str = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options. Please contact us through an Azure support request at: https://go.microsoft.com/fwlink/?linkid=2213926 for further questions.","type":"invalid_request_error","param":null,"code":null}}"#;

/// `policy-id` of a 429 from the token budget.
pub const POLICY_TOKENS: &str = "DeploymentRatelimit-Token";
/// `policy-id` of a 429 from the request budget.
pub const POLICY_CALLS: &str = "DeploymentRatelimit-Call";

/// What Azure's admission 429 body names.
pub struct RateLimitMessage<'a> {
    /// The deployment's model name.
    pub model: &'a str,
    pub deployment: &'a str,
    pub region: &'a str,
    /// Operation key (`chat`, `embeddings`, …).
    pub op: &'a str,
    /// Empty on the v1 surface.
    pub api_version: &'a str,
    pub retry_after: Duration,
    /// Token budget (true) or request budget (false).
    pub tokens: bool,
}

/// Azure's current 429 body for a deployment over its quota (`RateLimitReached`),
/// e.g. "Your requests to gpt-4o for gpt-4o in East US have exceeded the token
/// rate limit for your current OpenAI S0 pricing tier. This request was for
/// ChatCompletions_Create under Azure OpenAI API version 2024-10-21. Please
/// retry after 43 seconds. To increase your default rate limit, visit:
/// https://aka.ms/oai/quotaincrease."
pub fn rate_limit_reached(m: &RateLimitMessage<'_>) -> String {
    let secs = ceil_secs(m.retry_after);
    let message = format!(
        "Your requests to {} for {} in {} have exceeded the {} rate limit for your current OpenAI S0 pricing tier. This request was for {} under Azure OpenAI API version {}. Please retry after {} second{}. To increase your default rate limit, visit: https://aka.ms/oai/quotaincrease.",
        m.model,
        m.deployment,
        m.region,
        if m.tokens { "token" } else { "call" },
        operation_name(m.op),
        if m.api_version.is_empty() {
            "v1"
        } else {
            m.api_version
        },
        secs,
        if secs == 1 { "" } else { "s" },
    );
    serde_json::json!({"error": {"code": "RateLimitReached", "message": message}}).to_string()
}

/// Azure's operation name for a route, as it appears in 429 messages.
pub fn operation_name(op: &str) -> &'static str {
    match op {
        "chat" => "ChatCompletions_Create",
        "completions" => "Completions_Create",
        "embeddings" => "Embeddings_Create",
        "images" => "ImageGenerations_Create",
        "transcriptions" => "Transcriptions_Create",
        "translations" => "Translations_Create",
        "speech" => "Speech_Create",
        "responses" => "Responses_Create",
        _ => "Operation",
    }
}

/// Azure's 429 body. `tokens` picks the token-rate wording over the call-rate one.
pub fn too_many_requests(
    op: &str,
    api_version: &str,
    retry_after: Duration,
    tokens: bool,
) -> String {
    let secs = ceil_secs(retry_after);
    let what = if tokens {
        "token rate limit"
    } else {
        "call rate limit"
    };
    format!(
        r#"{{"error":{{"code":"429","message":"Requests to the {} Operation under Azure OpenAI API version {} have exceeded {} of your current OpenAI S0 pricing tier. Please retry after {} second{}. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}}}"#,
        operation_name(op),
        if api_version.is_empty() {
            "v1"
        } else {
            api_version
        },
        what,
        secs,
        if secs == 1 { "" } else { "s" },
    )
}

/// The 429 body of a provisioned (PTU) deployment over 100% utilization.
/// Azure's exact wording for it is not captured: this keeps the shape and
/// `code` of [`too_many_requests`] and says what ran out.
pub fn ptu_too_many_requests(op: &str, api_version: &str, retry_after: Duration) -> String {
    let secs = ceil_secs(retry_after);
    let message = format!(
        "Requests to the {} Operation under Azure OpenAI API version {} have exceeded the provisioned throughput of this deployment (utilization over 100%). Please retry after {} second{}.",
        operation_name(op),
        if api_version.is_empty() {
            "v1"
        } else {
            api_version
        },
        secs,
        if secs == 1 { "" } else { "s" },
    );
    serde_json::json!({"error": {"code": "429", "message": message}}).to_string()
}

/// The canonical body for a status a fault asks for.
pub fn canonical_error(status: u16) -> String {
    match status {
        400 => r#"{"error":{"code":"BadRequest","message":"Bad request."}}"#.to_owned(),
        401 => UNAUTHORIZED.to_owned(),
        403 => r#"{"error":{"code":"403","message":"Access denied."}}"#.to_owned(),
        404 => RESOURCE_NOT_FOUND.to_owned(),
        408 => r#"{"error":{"code":"Timeout","message":"The operation was timeout."}}"#.to_owned(),
        429 => too_many_requests("chat", "2024-10-21", Duration::from_secs(1), false),
        500 => SERVER_ERROR.to_owned(),
        502 => r#"{"error":{"code":"BadGateway","message":"Bad gateway."}}"#.to_owned(),
        503 => r#"{"error":{"code":"ServiceUnavailable","message":"The service is temporarily unable to process your request. Please try again later."}}"#.to_owned(),
        504 => r#"{"error":{"code":"Timeout","message":"The operation was timeout."}}"#.to_owned(),
        s => format!(r#"{{"error":{{"code":"{s}","message":"Simulated failure."}}}}"#),
    }
}

/// Seconds rounded up, never below 1 for a non-zero wait.
pub fn ceil_secs(d: Duration) -> u64 {
    let ms = d.as_millis();
    u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX)
}

/// A 400 `invalid_request_error` body with a message and the offending param.
pub fn invalid_request(message: &str, param: Option<&str>, code: Option<&str>) -> String {
    serde_json::json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    })
    .to_string()
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A random UUID-shaped id (version 4 layout), as Azure uses for request ids.
pub fn uuid() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let mut s = String::with_capacity(36);
    let _ = write!(
        s,
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    );
    s
}

/// An object id like `chatcmpl-<24 chars>`.
pub fn object_id(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 24);
    s.push_str(prefix);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    for _ in 0..24 {
        let i = fastrand::usize(..ALPHABET.len());
        s.push(char::from(ALPHABET[i]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_bodies_are_valid_json() {
        for b in [
            RESOURCE_NOT_FOUND,
            UNAUTHORIZED,
            DEPLOYMENT_NOT_FOUND,
            SERVER_ERROR,
            FILTER_RESULTS_SAFE,
            CONTENT_FILTER,
        ] {
            serde_json::from_str::<serde_json::Value>(b).unwrap();
        }
        for s in [400, 401, 403, 404, 408, 429, 500, 502, 503, 504, 599] {
            serde_json::from_str::<serde_json::Value>(&canonical_error(s)).unwrap();
        }
    }

    #[test]
    fn too_many_requests_rounds_the_wait_up() {
        let b = too_many_requests("chat", "2024-10-21", Duration::from_millis(1500), true);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("ChatCompletions_Create"));
        assert!(msg.contains("token rate limit"));
        assert!(msg.contains("retry after 2 seconds"));
        assert_eq!(v["error"]["code"], "429");
    }

    #[test]
    fn rate_limit_reached_names_model_deployment_region_and_wait() {
        let b = rate_limit_reached(&RateLimitMessage {
            model: "gpt-4o-2024-08-06",
            deployment: "chat",
            region: "Sweden Central",
            op: "chat",
            api_version: "2024-10-21",
            retry_after: Duration::from_millis(42_001),
            tokens: true,
        });
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["code"], "RateLimitReached");
        assert_eq!(
            v["error"]["message"],
            "Your requests to gpt-4o-2024-08-06 for chat in Sweden Central have exceeded the token rate limit for your current OpenAI S0 pricing tier. This request was for ChatCompletions_Create under Azure OpenAI API version 2024-10-21. Please retry after 43 seconds. To increase your default rate limit, visit: https://aka.ms/oai/quotaincrease."
        );
        serde_json::from_str::<serde_json::Value>(UNRECOGNIZED_STREAM_OPTIONS).unwrap();
    }

    #[test]
    fn uuid_has_the_usual_shape() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(u.as_bytes()[14], b'4');
    }
}
