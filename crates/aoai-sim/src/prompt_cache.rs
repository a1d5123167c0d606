//! Azure's prompt caching, deterministically: a prompt of at least 1024 tokens
//! whose first 1024 (then 1152, 1280, … in steps of 128) tokens this deployment
//! has seen within the last 10 minutes reports the longest such prefix as
//! `cached_tokens`. Prefixes are remembered per deployment by hash, framing
//! tokens included, so identical system prompts and conversations hit and a
//! change anywhere in the first 1024 tokens misses.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Shortest prompt that can be cached, in tokens.
pub const PROMPT_CACHE_MIN_TOKENS: usize = 1024;
/// Cached prefixes grow in steps of this many tokens.
pub const PROMPT_CACHE_STEP_TOKENS: usize = 128;
/// A prefix not used for this long is forgotten (Azure: 5 to 10 minutes).
pub const PROMPT_CACHE_TTL: Duration = Duration::from_secs(600);
/// Prefixes remembered per deployment; when full, the deployment's cache is
/// emptied, which only costs future hits.
const MAX_PREFIXES: usize = 100_000;

#[derive(Default)]
pub(crate) struct PromptCache {
    deps: Mutex<HashMap<String, HashMap<u64, Instant>>>,
}

/// Hash of each cacheable prefix of `ids`, shortest first.
fn prefix_hashes(ids: &[u32]) -> Vec<u64> {
    let mut out = Vec::new();
    if ids.len() < PROMPT_CACHE_MIN_TOKENS {
        return out;
    }
    // Fixed keys: the same prompt hashes alike in every run.
    let mut h = DefaultHasher::new();
    for (i, id) in ids.iter().enumerate() {
        h.write_u32(*id);
        let len = i + 1;
        if len >= PROMPT_CACHE_MIN_TOKENS
            && (len - PROMPT_CACHE_MIN_TOKENS).is_multiple_of(PROMPT_CACHE_STEP_TOKENS)
        {
            out.push(h.clone().finish());
        }
    }
    out
}

impl PromptCache {
    /// Cached tokens of a prompt with these token ids on `deployment` at `now`,
    /// then remember its prefixes.
    pub(crate) fn lookup(&self, deployment: &str, ids: &[u32], now: Instant) -> u64 {
        let hashes = prefix_hashes(ids);
        if hashes.is_empty() {
            return 0;
        }
        let mut deps = self
            .deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = match deps.get_mut(deployment) {
            Some(s) => s,
            None => deps.entry(deployment.to_owned()).or_default(),
        };
        let hits = hashes
            .iter()
            .take_while(|h| {
                seen.get(h)
                    .is_some_and(|t| now.saturating_duration_since(*t) < PROMPT_CACHE_TTL)
            })
            .count();
        if seen.len() + hashes.len() > MAX_PREFIXES {
            seen.clear();
        }
        for h in hashes {
            seen.insert(h, now);
        }
        if hits == 0 {
            0
        } else {
            (PROMPT_CACHE_MIN_TOKENS + (hits - 1) * PROMPT_CACHE_STEP_TOKENS) as u64
        }
    }

    pub(crate) fn clear(&self) {
        self.deps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_long_prefix_is_cached_in_steps_of_128() {
        let c = PromptCache::default();
        let t = Instant::now();
        let a: Vec<u32> = (0..1300).collect();
        assert_eq!(c.lookup("d", &a, t), 0);
        // Same first 1200 tokens, different tail: 1024 + 128 cached.
        let mut b: Vec<u32> = (0..1200).collect();
        b.extend(5000..5200);
        assert_eq!(c.lookup("d", &b, t), 1152);
        assert_eq!(c.lookup("d", &a, t), 1280);
        // Short prompts and other deployments never hit.
        assert_eq!(c.lookup("d", &a[..1000], t), 0);
        assert_eq!(c.lookup("e", &a, t), 0);
        // A change in the first 1024 tokens misses.
        let mut d = a.clone();
        d[3] = 99_999;
        assert_eq!(c.lookup("d", &d, t), 0);
    }

    #[test]
    fn prefixes_expire_after_the_ttl() {
        let c = PromptCache::default();
        let t = Instant::now();
        let a: Vec<u32> = (0..1024).collect();
        c.lookup("d", &a, t);
        assert_eq!(
            c.lookup("d", &a, t + PROMPT_CACHE_TTL - Duration::from_secs(1)),
            1024
        );
        assert_eq!(c.lookup("d", &a, t + PROMPT_CACHE_TTL * 3), 0);
    }
}
