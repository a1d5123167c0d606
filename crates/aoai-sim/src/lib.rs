//! aoai-sim: a fast Azure OpenAI simulator that behaves like Azure on the wire,
//! failures included. Start instances in-process with [`start`] (tests) or run the
//! `aoai-sim` binary (demos, benchmarks).
//!
//! ```no_run
//! # async fn demo() -> Result<(), aoai_sim::SimError> {
//! use aoai_sim::{Fault, InstanceConfig};
//! let sims = aoai_sim::start(vec![
//!     InstanceConfig::new("east").deployments(&["gpt-4o"]),
//!     InstanceConfig::new("west").fault(Fault::Fail { count: Some(1), status: 503, body: None, retry_after_ms: None }),
//! ]).await?;
//! println!("{}", sims[0].url());
//! # Ok(()) }
//! ```

// Handlers return `Result<Reply, Reply>`: the error arm is a complete response
// built once on a cold path, so boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

mod access;
mod admin;
mod azure;
mod body;
mod clock;
mod config;
mod fault;
pub mod identity;
mod journal;
mod jwt;
mod media;
mod multipart;
mod openai;
mod prompt_cache;
mod ptu;
mod ratelimit;
mod realtime;
mod responses;
mod server;
mod service;
mod store;
mod tokens;
mod usage;

pub use clock::SimClock;
pub use config::{
    DEFAULT_API_KEY, DEFAULT_EMBEDDING_DIMENSIONS, DEFAULT_JOURNAL_CAPACITY,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_REASONING_TOKENS, DEFAULT_REGION, DEFAULT_REPLY_TOKENS,
    DeploymentOverride, InstanceConfig, Latency, Ptu, RateLimit,
};
pub use fault::Fault;
pub use identity::{
    ClientToken, IdentityConfig, IdentityCounts, IdentityHandle, SigningKey, start_identity,
    start_identity_on,
};
pub use journal::{JournalEntry, Outcome};
pub use openai::{STREAM_OPTIONS_SINCE, embedding_vector};
pub use prompt_cache::{PROMPT_CACHE_MIN_TOKENS, PROMPT_CACHE_STEP_TOKENS, PROMPT_CACHE_TTL};
pub use ratelimit::{UNLIMITED_REMAINING_REQUESTS, UNLIMITED_REMAINING_TOKENS};
pub use server::{SimError, SimHandle, start, start_on};
pub use usage::{Usage, UsageReport};

/// The tokenizers the simulator counts with, for tests that want the same
/// figures (e.g. a gateway's estimate compared with the simulator's report).
pub mod tokenizer {
    pub use crate::tokens::{
        Encoding, REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TOKENS_PER_NAME, count_chat,
        count_text, is_reasoning_model,
    };
}

/// Azure's canonical bodies, for tests that compare what a client received.
pub mod bodies {
    pub use crate::access::{AUTHENTICATION_TYPE_DISABLED, PERMISSION_DENIED, TOKEN_UNAUTHORIZED};
    pub use crate::azure::{
        CONTENT_FILTER, DEPLOYMENT_NOT_FOUND, FILTER_RESULTS_SAFE, POLICY_CALLS, POLICY_TOKENS,
        RESOURCE_NOT_FOUND, SERVER_ERROR, UNAUTHORIZED, UNRECOGNIZED_STREAM_OPTIONS,
        canonical_error,
    };
}
