//! Token usage: what one answered request cost, read from the response
//! itself wherever the instance reports it, estimated with a real tokenizer
//! where it does not.
//!
//! This module owns the figures and how they are read; attribution (to a
//! client, deployment and instance), metrics and the access log take a
//! finished [`Usage`] from it.
//!
//! - [`Usage`] and [`Source`]: the four kinds (prompt, completion, cached,
//!   reasoning) and whether they were reported or estimated.
//! - [`parse_usage_object`] / [`parse_event`]: Azure's and OpenAI's usage
//!   shapes (chat, completions and embeddings `usage`, Responses `usage`).
//! - [`body::BodyUsage`]: finds the top-level `usage` of a non-streaming
//!   JSON body while it passes through, chunk by chunk, without keeping the
//!   body.
//! - [`sse::SseScanner`]: finds the usage event of an event stream and, when
//!   the gateway asked for it on the client's behalf, removes exactly that
//!   event from what the client receives.
//! - [`inject`]: adds `stream_options.include_usage` to a streaming chat
//!   request when the api-version accepts it.
//! - [`estimate`]: o200k/cl100k token counts for prompts and streamed text.

pub mod body;
pub mod estimate;
pub mod inject;
pub mod meter;
mod object;
pub mod sse;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use serde::{Deserialize, Serialize};

/// Tokens counted, by client, client-facing deployment, instance, kind
/// (`prompt`, `completion`, `cached`, `reasoning`) and source (`reported`,
/// `estimated`).
pub const TOKENS_TOTAL: &str = "aoai_lb_tokens_total";

/// Adds one response's usage to [`TOKENS_TOTAL`] under (client,
/// deployment, instance). Zero kinds are still touched, so every series of
/// a used combination exists.
///
/// The four counter handles of each label combination are looked up once
/// and kept (combinations are bounded by the configuration: client names,
/// configured deployments, instance names), so a request costs a map
/// lookup instead of four registry lookups with label allocations.
pub fn count(client: &str, deployment: &str, instance: &str, u: &Usage) {
    type Counters = [metrics::Counter; 4];
    static HANDLES: LazyLock<RwLock<HashMap<String, Counters>>> =
        LazyLock::new(|| RwLock::new(HashMap::new()));
    thread_local! {
        static KEY: RefCell<String> = const { RefCell::new(String::new()) };
    }
    let source = u.source.as_str();
    KEY.with_borrow_mut(|key| {
        key.clear();
        for part in [client, deployment, instance, source] {
            key.push_str(part);
            key.push('\0');
        }
        let bump = |c: &Counters| {
            for (counter, (_, n)) in c.iter().zip(u.kinds()) {
                counter.increment(n);
            }
        };
        if let Some(c) = HANDLES
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key.as_str())
        {
            bump(c);
            return;
        }
        let make = |kind: &'static str| {
            metrics::counter!(
                TOKENS_TOTAL,
                "client" => client.to_owned(),
                "deployment" => deployment.to_owned(),
                "instance" => instance.to_owned(),
                "kind" => kind,
                "source" => source,
            )
        };
        let c = [
            make("prompt"),
            make("completion"),
            make("cached"),
            make("reasoning"),
        ];
        bump(&c);
        HANDLES
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), c);
    });
}

/// Where a [`Usage`] figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Read from the instance's own `usage` (exact, what Azure bills).
    #[default]
    Reported,
    /// Counted by the gateway with a tokenizer: the api-version could not
    /// ask for usage, or the stream ended before its usage arrived.
    Estimated,
}

impl Source {
    /// The metric label value: `reported` or `estimated`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Reported => "reported",
            Source::Estimated => "estimated",
        }
    }
}

/// Tokens of one request.
///
/// `cached` is a subset of `prompt` and `reasoning` a subset of
/// `completion`, as Azure reports them; the billable total is
/// `prompt + completion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Usage {
    /// Prompt (input) tokens, cached ones included.
    pub prompt: u64,
    /// Completion (output) tokens, reasoning ones included.
    pub completion: u64,
    /// Prompt tokens served from the prompt cache.
    pub cached: u64,
    /// Completion tokens spent on hidden reasoning (o-series, gpt-5).
    pub reasoning: u64,
    /// Reported by the instance or estimated by the gateway.
    pub source: Source,
}

impl Usage {
    /// Prompt plus completion: what counts against a token limit.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    /// The four kinds with their metric label, in a fixed order.
    pub fn kinds(&self) -> [(&'static str, u64); 4] {
        [
            ("prompt", self.prompt),
            ("completion", self.completion),
            ("cached", self.cached),
            ("reasoning", self.reasoning),
        ]
    }
}

/// The usage object as chat, completions, embeddings (`prompt_tokens`,
/// `completion_tokens`, `*_tokens_details`) and the Responses API
/// (`input_tokens`, `output_tokens`, `*_tokens_details`) send it. Unknown
/// fields (`total_tokens`, audio and prediction details) are ignored;
/// `null` anywhere counts as absent.
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<RawDetails>,
    completion_tokens_details: Option<RawDetails>,
    input_tokens_details: Option<RawDetails>,
    output_tokens_details: Option<RawDetails>,
}

#[derive(Deserialize)]
struct RawDetails {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() {
            return None;
        }
        let cached = self
            .prompt_tokens_details
            .or(self.input_tokens_details)
            .and_then(|d| d.cached_tokens);
        let reasoning = self
            .completion_tokens_details
            .or(self.output_tokens_details)
            .and_then(|d| d.reasoning_tokens);
        Some(Usage {
            prompt: prompt.unwrap_or(0),
            completion: completion.unwrap_or(0),
            cached: cached.unwrap_or(0),
            reasoning: reasoning.unwrap_or(0),
            source: Source::Reported,
        })
    }
}

/// Reads a usage object (the value of a `usage` key). `None` for `null`,
/// anything that is not such an object, or one with neither prompt nor
/// completion counts.
///
/// The common shape is read directly ([`object`]); serde decides the rest,
/// so the answer is serde's either way.
pub fn parse_usage_object(json: &[u8]) -> Option<Usage> {
    let raw = match object::read(json) {
        Some(raw) => raw,
        None => serde_json::from_slice::<Option<RawUsage>>(json)
            .ok()
            .flatten(),
    };
    raw.and_then(RawUsage::into_usage)
}

/// What one JSON document (a whole response body or one stream event's
/// data) says about usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventUsage {
    /// The usage found: top-level `usage`, or `response.usage` (Responses
    /// stream events `response.completed`, `.incomplete`, `.failed`).
    pub usage: Usage,
    /// True for a chat/completions usage chunk: a top-level `choices` that
    /// is an empty array next to a top-level `usage`. Only such an event is
    /// ever removed from a stream.
    pub usage_chunk: bool,
}

#[derive(Deserialize)]
struct RawEvent {
    usage: Option<RawUsage>,
    response: Option<RawResponse>,
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize)]
struct RawResponse {
    usage: Option<RawUsage>,
}

/// Reads the usage of a JSON document. `None` when it is not a JSON object
/// or carries no usage.
pub fn parse_event(json: &[u8]) -> Option<EventUsage> {
    let e: RawEvent = serde_json::from_slice(json).ok()?;
    if let Some(u) = e.usage.and_then(RawUsage::into_usage) {
        return Some(EventUsage {
            usage: u,
            usage_chunk: e.choices.is_some_and(|c| c.is_empty()),
        });
    }
    let u = e.response?.usage?.into_usage()?;
    Some(EventUsage {
        usage: u,
        usage_chunk: false,
    })
}

/// The inference endpoints whose responses carry usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `chat/completions`.
    Chat,
    /// Legacy `completions`.
    Completions,
    /// `embeddings`.
    Embeddings,
    /// The Responses API (`/openai/v1/responses`, `/openai/responses`).
    Responses,
}

impl Endpoint {
    /// Classifies a POST path (with or without the `/openai` prefix, on the
    /// dated `/deployments/{dep}/...` surface or on `/v1/...`). `None` for
    /// every other path, including `GET /responses/{id}`.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        let rest = path.strip_prefix("/openai").unwrap_or(path);
        let rest = rest.trim_end_matches('/');
        let tail = if let Some(v1) = rest.strip_prefix("/v1/") {
            v1
        } else if let Some(dated) = rest.strip_prefix("/deployments/") {
            dated.split_once('/')?.1
        } else {
            rest.strip_prefix('/')?
        };
        match tail {
            "chat/completions" => Some(Endpoint::Chat),
            "completions" => Some(Endpoint::Completions),
            "embeddings" => Some(Endpoint::Embeddings),
            "responses" => Some(Endpoint::Responses),
            _ => None,
        }
    }

    /// Whether this path is on the `/openai/v1` surface, where api-version
    /// is optional and every feature of the current API is accepted.
    pub fn is_v1_path(path: &str) -> bool {
        let rest = path.strip_prefix("/openai").unwrap_or(path);
        rest.starts_with("/v1/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_usage_with_cached_and_reasoning_details() {
        let u = parse_usage_object(
            br#"{"completion_tokens":120,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":64,"rejected_prediction_tokens":0},"prompt_tokens":1566,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":1408},"total_tokens":1686}"#,
        )
        .unwrap();
        assert_eq!(
            u,
            Usage {
                prompt: 1566,
                completion: 120,
                cached: 1408,
                reasoning: 64,
                source: Source::Reported
            }
        );
        assert_eq!(u.total(), 1686);
    }

    #[test]
    fn reads_embeddings_usage_without_completion() {
        let u = parse_usage_object(br#"{"prompt_tokens":8,"total_tokens":8}"#).unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.cached, u.reasoning),
            (8, 0, 0, 0)
        );
    }

    #[test]
    fn reads_responses_usage() {
        let u = parse_usage_object(
            br#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":4},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":20},"total_tokens":123}"#,
        )
        .unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.cached, u.reasoning),
            (36, 87, 4, 20)
        );
    }

    #[test]
    fn null_details_and_null_usage_are_absent() {
        let u = parse_usage_object(
            br#"{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":null,"completion_tokens_details":{"reasoning_tokens":null}}"#,
        )
        .unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.cached, u.reasoning),
            (3, 2, 0, 0)
        );
        assert_eq!(parse_usage_object(b"null"), None);
        assert_eq!(parse_usage_object(b"{}"), None);
        assert_eq!(parse_usage_object(br#"{"prompt_tokens":-1}"#), None);
        assert_eq!(parse_usage_object(b"[1]"), None);
    }

    #[test]
    fn finds_usage_chunks_and_responses_completed_events() {
        let chunk = br#"{"choices":[],"created":1,"id":"x","model":"gpt-4o","object":"chat.completion.chunk","usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let e = parse_event(chunk).unwrap();
        assert!(e.usage_chunk);
        assert_eq!((e.usage.prompt, e.usage.completion), (5, 7));

        let first = br#"{"id":"","object":"","created":0,"model":"","prompt_filter_results":[],"choices":[],"usage":null}"#;
        assert_eq!(parse_event(first), None);

        let body = br#"{"choices":[{"index":0,"message":{"content":"hi"}}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#;
        let e = parse_event(body).unwrap();
        assert!(!e.usage_chunk, "a full body is never a usage chunk");

        let completed = br#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed","output":[],"usage":{"input_tokens":9,"output_tokens":4,"output_tokens_details":{"reasoning_tokens":1}}}}"#;
        let e = parse_event(completed).unwrap();
        assert!(!e.usage_chunk);
        assert_eq!(
            (e.usage.prompt, e.usage.completion, e.usage.reasoning),
            (9, 4, 1)
        );

        assert_eq!(parse_event(b"[DONE]"), None);
    }

    #[test]
    fn classifies_inference_paths() {
        use Endpoint::*;
        for (p, e) in [
            ("/openai/deployments/gpt-4o/chat/completions", Some(Chat)),
            ("/deployments/d/completions", Some(Completions)),
            ("/openai/deployments/emb/embeddings", Some(Embeddings)),
            ("/openai/v1/chat/completions", Some(Chat)),
            ("/openai/v1/embeddings/", Some(Embeddings)),
            ("/openai/v1/responses", Some(Responses)),
            ("/openai/responses", Some(Responses)),
            ("/openai/responses/resp_1", None),
            ("/openai/deployments/d/audio/speech", None),
            ("/openai/files", None),
        ] {
            assert_eq!(Endpoint::from_path(p), e, "{p}");
        }
        assert!(Endpoint::is_v1_path("/openai/v1/chat/completions"));
        assert!(!Endpoint::is_v1_path(
            "/openai/deployments/d/chat/completions"
        ));
    }
}
