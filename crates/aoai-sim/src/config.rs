//! Per-instance configuration: the builder used by Rust tests and the JSON shape
//! read from the CLI's config file. Both are the same type, so everything a test
//! can set can also be set from a file, and a typo in a file is an error that
//! names the field (`deny_unknown_fields`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::SimClock;
use crate::fault::Fault;

/// Default key every instance accepts unless told otherwise.
pub const DEFAULT_API_KEY: &str = "sim-key";
/// Default Azure region reported in `x-ms-region`.
pub const DEFAULT_REGION: &str = "East US";
/// Default length of generated replies, in tokens (one word = one token).
pub const DEFAULT_REPLY_TOKENS: u32 = 8;
/// Default journal capacity: older entries are dropped first.
pub const DEFAULT_JOURNAL_CAPACITY: usize = 10_000;
/// Default cap on a request body; larger bodies get 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default embedding width when the request has no `dimensions`
/// (text-embedding-3-small and ada-002 both use 1536).
pub const DEFAULT_EMBEDDING_DIMENSIONS: usize = 1536;
/// Default hidden reasoning tokens per choice of a reasoning model (o-series,
/// gpt-5); other models spend none unless configured.
pub const DEFAULT_REASONING_TOKENS: u32 = 32;

/// Latency model: time to first token, then a fixed delay per generated token.
///
/// A streamed reply sends its headers after `ttft_ms` and token `k` (1-based) at
/// `ttft_ms + k * per_token_ms`; a non-streamed reply is sent whole after
/// `ttft_ms + n * per_token_ms`. `jitter_pct` scales every delay by a factor drawn
/// uniformly from `[1 - j, 1 + j]` using a generator seeded with `seed`, so runs
/// are reproducible.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    /// Time to first token in milliseconds (default 0).
    pub ttft_ms: u64,
    /// Delay per generated token in milliseconds (default 0).
    pub per_token_ms: u64,
    /// Jitter in percent of each delay, 0..=100 (default 0 = none).
    pub jitter_pct: u8,
    /// Seed of the jitter generator (default 0).
    pub seed: u64,
}

impl Latency {
    /// True when no delay at all is configured, which lets the hot path skip timers.
    pub fn is_zero(&self) -> bool {
        self.ttft_ms == 0 && self.per_token_ms == 0
    }
}

/// Azure's admission model for one standard deployment.
///
/// Each admitted request reserves its estimate (prompt estimate + `max_tokens` ×
/// `n`) for a rolling 60 s against `tpm`; requests are limited to
/// `ceil(rpm / 6)` per rolling 10 s, as Azure does. A value of 0 disables that
/// dimension. See the crate README for the estimate's exact rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Requests per minute (0 = unlimited).
    pub rpm: u32,
    /// Tokens per minute (0 = unlimited).
    pub tpm: u32,
    /// Also send `x-ratelimit-limit-requests` (the 10 s budget) and
    /// `x-ratelimit-limit-tokens` (the TPM). Default off: Azure's standard
    /// deployments mostly send only the `remaining` pair.
    pub limit_headers: bool,
    /// Completion tokens reserved when a request sets no `max_tokens` /
    /// `max_completion_tokens` / `max_output_tokens`. Default (`None`): the
    /// length the simulator will generate (reasoning included), so the
    /// reservation then equals the real usage. Azure reportedly reserves far
    /// more (the model's maximum output); set e.g. 4096 to mimic that.
    pub default_max_tokens: Option<u32>,
}

/// Azure's provisioned-throughput (PTU) model for one deployment, instead of
/// the standard [`RateLimit`]: a leaky bucket that drains
/// `tokens_per_minute`, utilization = what it holds against one minute of
/// that, 429 while utilization is over 100%. Replies carry
/// `azure-openai-deployment-utilization` instead of the
/// `x-ratelimit-remaining-*` pair. See the crate README, "PTU deployments".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ptu {
    /// Tokens the provisioned capacity processes per minute (0 is taken as 1).
    pub tokens_per_minute: u32,
}

/// Settings that differ for one deployment; unset fields fall back to the instance's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentOverride {
    /// Latency for this deployment only.
    pub latency: Option<Latency>,
    /// Quota for this deployment only.
    pub rate_limit: Option<RateLimit>,
    /// Reply length for this deployment only.
    pub reply_tokens: Option<u32>,
    /// Model name for this deployment only (bodies, tokenizer, reasoning).
    pub model: Option<String>,
    /// Hidden reasoning tokens per choice for this deployment only.
    pub reasoning_tokens: Option<u32>,
    /// Prompt caching for this deployment only.
    pub prompt_cache: Option<bool>,
    /// Make this a provisioned (PTU) deployment: its admission follows this
    /// model and no `rate_limit` applies to it.
    pub ptu: Option<Ptu>,
}

/// Everything about one simulated Azure OpenAI resource.
///
/// Defaults: key `sim-key`, region `East US`, serves any deployment name, no
/// latency, no rate limits, no faults, 8-token replies, 32 reasoning tokens for
/// reasoning models only, prompt caching on, a journal of 10 000 entries, admin
/// routes off, 32 MiB body cap, the system clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstanceConfig {
    /// Name used in logs, `x-aoai-sim-instance` and the journal.
    pub name: String,
    /// Key accepted in `api-key` or `Authorization: Bearer`.
    pub api_key: String,
    /// Reported in `x-ms-region`.
    pub region: String,
    /// Deployments served; `None` serves any name, others get 404 `DeploymentNotFound`.
    pub deployments: Option<Vec<String>>,
    /// Model name reported in bodies; `None` reports the deployment name. It
    /// also picks the tokenizer (`o200k_base` or `cl100k_base`) and whether the
    /// deployment is a reasoning model.
    pub model: Option<String>,
    /// Latency model for every deployment.
    pub latency: Latency,
    /// Reply length in tokens (capped by the request's `max_tokens`).
    pub reply_tokens: u32,
    /// Hidden reasoning tokens per choice; `None` = 32 for reasoning models
    /// (o-series, gpt-5 except `-chat`) and 0 for the others.
    pub reasoning_tokens: Option<u32>,
    /// Report `cached_tokens` for prompts of 1024 tokens or more whose prefix
    /// this deployment has seen before, as Azure's prompt caching does
    /// (default on).
    pub prompt_cache: bool,
    /// Admission model applied to each deployment separately; `None` = unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Per-deployment overrides of latency, quota and reply length.
    pub deployment_overrides: BTreeMap<String, DeploymentOverride>,
    /// Faults active from start-up.
    pub faults: Vec<Fault>,
    /// Journal ring size; the oldest entries are dropped first.
    pub journal_capacity: usize,
    /// Whether the `/_sim/` admin routes answer (default off).
    pub admin: bool,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Embedding width when the request has no `dimensions`.
    pub embedding_dimensions: usize,
    /// Close a keep-alive connection that has not started a new request within
    /// this many milliseconds (as Azure's front ends close idle connections);
    /// `None` keeps idle connections open forever.
    pub idle_timeout_ms: Option<u64>,
    /// Azure's `disableLocalAuth`: keys get 403 `AuthenticationTypeDisabled`
    /// and only Entra ID bearer tokens are accepted (default off).
    pub local_auth_disabled: bool,
    /// Principals (`oid`, `appid` or `azp`) holding the "Cognitive Services
    /// OpenAI User" role; a valid token of anyone else gets 401
    /// `PermissionDenied`. `None` (default): every valid token of the tenant.
    pub entra_principals: Option<Vec<String>>,
    /// Clock of the admission windows and the prompt cache; `None` = a system
    /// clock of the instance's own. Not part of the config file.
    #[serde(skip)]
    pub clock: Option<SimClock>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self::new("sim")
    }
}

impl InstanceConfig {
    /// A new instance with the defaults listed on the type.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            api_key: DEFAULT_API_KEY.to_owned(),
            region: DEFAULT_REGION.to_owned(),
            deployments: None,
            model: None,
            latency: Latency::default(),
            reply_tokens: DEFAULT_REPLY_TOKENS,
            reasoning_tokens: None,
            prompt_cache: true,
            rate_limit: None,
            deployment_overrides: BTreeMap::new(),
            faults: Vec::new(),
            journal_capacity: DEFAULT_JOURNAL_CAPACITY,
            admin: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            embedding_dimensions: DEFAULT_EMBEDDING_DIMENSIONS,
            idle_timeout_ms: None,
            local_auth_disabled: false,
            entra_principals: None,
            clock: None,
        }
    }

    /// Azure's `disableLocalAuth`: refuse keys, accept only Entra ID tokens.
    pub fn local_auth_disabled(mut self, disabled: bool) -> Self {
        self.local_auth_disabled = disabled;
        self
    }

    /// Only these principals (`oid`, `appid` or `azp`) hold the data-plane
    /// role; other valid tokens get 401 `PermissionDenied`.
    pub fn entra_principals(mut self, ids: &[&str]) -> Self {
        self.entra_principals = Some(ids.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Accept this key instead of `sim-key`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = key.into();
        self
    }

    /// Report this region in `x-ms-region`.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// Serve only these deployments; any other name gets 404 `DeploymentNotFound`.
    pub fn deployments(mut self, names: &[&str]) -> Self {
        self.deployments = Some(names.iter().map(|s| (*s).to_owned()).collect());
        self
    }

    /// Report this model name in response bodies instead of the deployment name.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Time to first token and delay per token, in milliseconds.
    pub fn latency(mut self, ttft_ms: u64, per_token_ms: u64) -> Self {
        self.latency.ttft_ms = ttft_ms;
        self.latency.per_token_ms = per_token_ms;
        self
    }

    /// Scale every delay by a seeded random factor in `[1 - pct%, 1 + pct%]`.
    pub fn jitter(mut self, pct: u8, seed: u64) -> Self {
        self.latency.jitter_pct = pct.min(100);
        self.latency.seed = seed;
        self
    }

    /// Length of generated replies in tokens (default 8).
    pub fn reply_tokens(mut self, n: u32) -> Self {
        self.reply_tokens = n;
        self
    }

    /// Quota per deployment: `rpm` (`ceil(rpm / 6)` per rolling 10 s) and `tpm`
    /// (rolling 60 s reservations); 0 = unlimited. Other admission settings keep
    /// their defaults (see [`InstanceConfig::admission`]).
    pub fn rate_limit(mut self, rpm: u32, tpm: u32) -> Self {
        self.rate_limit = Some(RateLimit {
            rpm,
            tpm,
            ..RateLimit::default()
        });
        self
    }

    /// The whole admission model for every deployment.
    pub fn admission(mut self, rl: RateLimit) -> Self {
        self.rate_limit = Some(rl);
        self
    }

    /// Quota for one deployment only, overriding [`InstanceConfig::rate_limit`].
    pub fn deployment_rate_limit(self, deployment: &str, rpm: u32, tpm: u32) -> Self {
        self.deployment_admission(
            deployment,
            RateLimit {
                rpm,
                tpm,
                ..RateLimit::default()
            },
        )
    }

    /// The whole admission model for one deployment only.
    pub fn deployment_admission(mut self, deployment: &str, rl: RateLimit) -> Self {
        self.deployment_overrides
            .entry(deployment.to_owned())
            .or_default()
            .rate_limit = Some(rl);
        self
    }

    /// Make `deployment` a provisioned (PTU) deployment processing
    /// `tokens_per_minute` (see [`Ptu`]); no rate limit applies to it then.
    pub fn deployment_ptu(mut self, deployment: &str, tokens_per_minute: u32) -> Self {
        self.deployment_overrides
            .entry(deployment.to_owned())
            .or_default()
            .ptu = Some(Ptu { tokens_per_minute });
        self
    }

    /// Model name for one deployment only (bodies, tokenizer, reasoning).
    pub fn deployment_model(mut self, deployment: &str, model: impl Into<String>) -> Self {
        self.deployment_overrides
            .entry(deployment.to_owned())
            .or_default()
            .model = Some(model.into());
        self
    }

    /// Hidden reasoning tokens per choice, for every deployment (0 turns
    /// reasoning off even for reasoning models).
    pub fn reasoning_tokens(mut self, n: u32) -> Self {
        self.reasoning_tokens = Some(n);
        self
    }

    /// Hidden reasoning tokens per choice for one deployment only.
    pub fn deployment_reasoning_tokens(mut self, deployment: &str, n: u32) -> Self {
        self.deployment_overrides
            .entry(deployment.to_owned())
            .or_default()
            .reasoning_tokens = Some(n);
        self
    }

    /// Turn prompt caching on or off (default on).
    pub fn prompt_cache(mut self, enabled: bool) -> Self {
        self.prompt_cache = enabled;
        self
    }

    /// Use this clock for the admission windows; give several instances clones
    /// of one clock to move them together.
    pub fn clock(mut self, clock: SimClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Latency for one deployment only, overriding [`InstanceConfig::latency`].
    pub fn deployment_latency(mut self, deployment: &str, ttft_ms: u64, per_token_ms: u64) -> Self {
        let entry = self
            .deployment_overrides
            .entry(deployment.to_owned())
            .or_default();
        entry.latency = Some(Latency {
            ttft_ms,
            per_token_ms,
            ..self.latency.clone()
        });
        self
    }

    /// Add a fault that is active from start-up.
    pub fn fault(mut self, f: Fault) -> Self {
        self.faults.push(f);
        self
    }

    /// Enable or disable the `/_sim/` admin routes (default off).
    pub fn admin(mut self, enabled: bool) -> Self {
        self.admin = enabled;
        self
    }

    /// Close keep-alive connections idle for this long (default: never).
    pub fn idle_timeout(mut self, ms: u64) -> Self {
        self.idle_timeout_ms = Some(ms);
        self
    }

    /// Journal ring size (default 10 000).
    pub fn journal_capacity(mut self, n: usize) -> Self {
        self.journal_capacity = n;
        self
    }

    /// Whether this instance serves `deployment`.
    pub(crate) fn serves(&self, deployment: &str) -> bool {
        match &self.deployments {
            None => true,
            Some(list) => list.iter().any(|d| d == deployment),
        }
    }

    /// The latency that applies to `deployment`.
    pub(crate) fn latency_for(&self, deployment: Option<&str>) -> &Latency {
        deployment
            .and_then(|d| self.deployment_overrides.get(d))
            .and_then(|o| o.latency.as_ref())
            .unwrap_or(&self.latency)
    }

    /// The PTU model of `deployment`, if it is a provisioned one.
    pub(crate) fn ptu_for(&self, deployment: &str) -> Option<Ptu> {
        self.deployment_overrides.get(deployment)?.ptu
    }

    /// The quota that applies to `deployment`, if any (none on a PTU
    /// deployment).
    pub(crate) fn rate_limit_for(&self, deployment: &str) -> Option<RateLimit> {
        let o = self.deployment_overrides.get(deployment);
        if o.is_some_and(|o| o.ptu.is_some()) {
            return None;
        }
        o.and_then(|o| o.rate_limit)
            .or(self.rate_limit)
            .filter(|r| r.rpm > 0 || r.tpm > 0)
    }

    /// The model name that applies to `deployment`.
    pub(crate) fn model_for<'a>(&'a self, deployment: &'a str) -> &'a str {
        self.deployment_overrides
            .get(deployment)
            .and_then(|o| o.model.as_deref())
            .or(self.model.as_deref())
            .unwrap_or(deployment)
    }

    /// Hidden reasoning tokens per choice for `deployment`.
    pub(crate) fn reasoning_tokens_for(&self, deployment: &str) -> u32 {
        self.deployment_overrides
            .get(deployment)
            .and_then(|o| o.reasoning_tokens)
            .or(self.reasoning_tokens)
            .unwrap_or_else(|| {
                if crate::tokens::is_reasoning_model(self.model_for(deployment)) {
                    DEFAULT_REASONING_TOKENS
                } else {
                    0
                }
            })
    }

    /// Whether prompt caching applies to `deployment`.
    pub(crate) fn prompt_cache_for(&self, deployment: &str) -> bool {
        self.deployment_overrides
            .get(deployment)
            .and_then(|o| o.prompt_cache)
            .unwrap_or(self.prompt_cache)
    }

    /// The reply length that applies to `deployment`.
    pub(crate) fn reply_tokens_for(&self, deployment: Option<&str>) -> u32 {
        deployment
            .and_then(|d| self.deployment_overrides.get(d))
            .and_then(|o| o.reply_tokens)
            .unwrap_or(self.reply_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_defaults_match_the_documented_ones() {
        let c = InstanceConfig::new("a");
        assert_eq!(c.api_key, "sim-key");
        assert!(c.serves("anything"));
        assert!(c.latency.is_zero());
        assert_eq!(c.reply_tokens, 8);
        assert_eq!(c.journal_capacity, 10_000);
        assert!(!c.admin);
    }

    #[test]
    fn deployment_override_wins_over_instance_quota() {
        let c = InstanceConfig::new("a")
            .rate_limit(60, 1000)
            .deployment_rate_limit("big", 600, 100_000);
        assert_eq!(
            c.rate_limit_for("big").map(|r| (r.rpm, r.tpm)),
            Some((600, 100_000))
        );
        assert_eq!(
            c.rate_limit_for("small").map(|r| (r.rpm, r.tpm)),
            Some((60, 1000))
        );
    }

    #[test]
    fn reasoning_defaults_follow_the_model_and_yield_to_configuration() {
        let c = InstanceConfig::new("a").deployment_model("r", "o3-mini");
        assert_eq!(c.reasoning_tokens_for("gpt-4o"), 0);
        assert_eq!(c.reasoning_tokens_for("o4-mini"), DEFAULT_REASONING_TOKENS);
        assert_eq!(c.reasoning_tokens_for("r"), DEFAULT_REASONING_TOKENS);
        assert_eq!(c.model_for("r"), "o3-mini");
        let c = c.reasoning_tokens(5).deployment_reasoning_tokens("r", 7);
        assert_eq!(c.reasoning_tokens_for("gpt-4o"), 5);
        assert_eq!(c.reasoning_tokens_for("r"), 7);
    }

    #[test]
    fn unknown_config_field_is_rejected_with_its_path() {
        let json = r#"{"name":"x","latency":{"ttft":5}}"#;
        let de = &mut serde_json::Deserializer::from_str(json);
        let err = serde_path_to_error::deserialize::<_, InstanceConfig>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "latency.ttft");
    }

    #[test]
    fn a_ptu_deployment_from_a_file_takes_no_rate_limit() {
        let json = r#"{"name":"x","rate_limit":{"tpm":1000},
            "deployment_overrides":{"ptu":{"ptu":{"tokens_per_minute":6000}}}}"#;
        let c: InstanceConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            c.ptu_for("ptu"),
            Some(Ptu {
                tokens_per_minute: 6000
            })
        );
        assert_eq!(c.rate_limit_for("ptu"), None);
        assert_eq!(c.ptu_for("std"), None);
        assert_eq!(c.rate_limit_for("std").map(|r| r.tpm), Some(1000));
        assert_eq!(
            c,
            InstanceConfig::new("x")
                .admission(RateLimit {
                    tpm: 1000,
                    ..RateLimit::default()
                })
                .deployment_ptu("ptu", 6000)
        );
        let bad = r#"{"deployment_overrides":{"ptu":{"ptu":{"tpm":6000}}}}"#;
        let de = &mut serde_json::Deserializer::from_str(bad);
        let err = serde_path_to_error::deserialize::<_, InstanceConfig>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "deployment_overrides.ptu.ptu.tpm");
    }
}
