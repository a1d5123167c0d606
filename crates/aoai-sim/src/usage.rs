//! The usage ledger: per deployment, the tokens this instance reported (or, for
//! a stream, produced), so that tests can compare a gateway's accounting with
//! the truth.
//!
//! What is recorded, and when:
//! - a non-streamed reply with a `usage` object (chat, completions, embeddings,
//!   Responses): one request and its usage, once the response is handed to the
//!   connection (a client that leaves during the latency delay costs nothing);
//! - a stream: one request with its prompt, cached and reasoning tokens as soon
//!   as the response starts, then its completion tokens as each content chunk is
//!   handed to the connection. A complete stream therefore adds exactly the usage
//!   it reports (or would report with `include_usage`); a stream the client
//!   abandons, or that a fault cuts, adds only the content tokens actually sent
//!   (reasoning tokens count in full: they were spent before the first chunk);
//! - a request refused by the admission model: one `throttled`, no tokens.
//!
//! Nothing else is recorded: errors, faulted requests, images, audio and
//! realtime sessions carry no token usage.
//!
//! Cached tokens are a subset of prompt tokens and reasoning tokens a subset of
//! completion tokens, as in Azure's `usage`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Token totals of one deployment (or of a whole instance).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Answered requests that carry usage (200s of chat, completions,
    /// embeddings and Responses).
    pub requests: u64,
    /// `prompt_tokens` / `input_tokens`, framing included.
    pub prompt_tokens: u64,
    /// `completion_tokens` / `output_tokens`, reasoning included; for streams,
    /// what was actually sent (see the module doc).
    pub completion_tokens: u64,
    /// `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// `completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`.
    pub reasoning_tokens: u64,
    /// Requests refused with 429 by the admission model (not in `requests`).
    pub throttled: u64,
}

impl Usage {
    /// `prompt_tokens + completion_tokens`, as `total_tokens` reports.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    fn add(&mut self, o: &Usage) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cached_tokens += o.cached_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
        self.throttled += o.throttled;
    }
}

/// One instance's ledger, as [`crate::SimHandle::usage`] and `GET /_sim/usage`
/// return it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The instance's name.
    pub instance: String,
    /// Sum over every deployment.
    pub total: Usage,
    /// Per deployment name as the request addressed it (path or body `model`).
    pub deployments: BTreeMap<String, Usage>,
}

impl UsageReport {
    /// The totals of `deployment` (all zero when it was never used).
    pub fn deployment(&self, deployment: &str) -> Usage {
        self.deployments
            .get(deployment)
            .copied()
            .unwrap_or_default()
    }

    /// Several instances' ledgers added up, per deployment (e.g. a whole fleet
    /// behind a gateway). The merged report's `instance` is empty.
    pub fn merged<'a>(reports: impl IntoIterator<Item = &'a UsageReport>) -> UsageReport {
        let mut out = UsageReport::default();
        for r in reports {
            out.total.add(&r.total);
            for (d, u) in &r.deployments {
                out.deployments.entry(d.clone()).or_default().add(u);
            }
        }
        out
    }
}

/// The live ledger of one instance.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    deps: Mutex<BTreeMap<String, Usage>>,
}

impl Ledger {
    fn with(&self, deployment: &str, f: impl FnOnce(&mut Usage)) {
        let mut deps = self
            .deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match deps.get_mut(deployment) {
            Some(u) => f(u),
            None => f(deps.entry(deployment.to_owned()).or_default()),
        }
    }

    /// Add `u` to `deployment`.
    pub(crate) fn record(&self, deployment: &str, u: &Usage) {
        self.with(deployment, |x| x.add(u));
    }

    /// Add completion tokens a stream just sent.
    pub(crate) fn completion(&self, deployment: &str, tokens: u64) {
        self.with(deployment, |x| x.completion_tokens += tokens);
    }

    /// Count a 429 from the admission model.
    pub(crate) fn throttled(&self, deployment: &str) {
        self.with(deployment, |x| x.throttled += 1);
    }

    pub(crate) fn report(&self, instance: &str) -> UsageReport {
        let deps = self
            .deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut total = Usage::default();
        for u in deps.values() {
            total.add(u);
        }
        UsageReport {
            instance: instance.to_owned(),
            total,
            deployments: deps,
        }
    }

    pub(crate) fn clear(&self) {
        self.deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// What a reply will add to the ledger when it is sent: the usage recorded at
/// the start, and for streams the completion tokens carried by each frame.
#[derive(Debug, Clone)]
pub(crate) struct Billing {
    pub(crate) deployment: String,
    /// Recorded when the response starts (for a full body: the whole usage).
    pub(crate) upfront: Usage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sums_deployments_and_merges_instances() {
        let l = Ledger::default();
        let u = Usage {
            requests: 1,
            prompt_tokens: 10,
            completion_tokens: 5,
            cached_tokens: 0,
            reasoning_tokens: 2,
            throttled: 0,
        };
        l.record("a", &u);
        l.record("b", &u);
        l.completion("b", 3);
        l.throttled("a");
        let r = l.report("east");
        assert_eq!(r.total.requests, 2);
        assert_eq!(r.total.completion_tokens, 13);
        assert_eq!(r.deployment("a").throttled, 1);
        assert_eq!(r.deployment("none"), Usage::default());
        let m = UsageReport::merged([&r, &r]);
        assert_eq!(m.deployment("b").completion_tokens, 16);
        assert_eq!(m.total.total_tokens(), 2 * r.total.total_tokens());
        l.clear();
        assert_eq!(l.report("east").total, Usage::default());
    }
}
