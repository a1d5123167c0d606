//! Client limits: sliding 60 s request and token windows, and token quotas
//! over calendar periods.
//!
//! Each limited client has one [`LimitState`] (one short-held lock): a
//! ledger of requests and one of tokens, both over the last 60 s, plus the
//! quota used in the current UTC day or month.
//!
//! - Admission ([`admit`]) counts the request and reserves an Azure-style
//!   estimate of its tokens ([`estimate_tokens`]) at the admission time.
//!   A request that does not fit is refused with the exact time until the
//!   entry that frees enough room leaves the window.
//! - When the response ends, [`Reservation::settle`] replaces the estimate
//!   with the tokens really used, in the ledger entry of the admission
//!   time, so the room comes back 60 s after admission as on Azure.
//!
//! Time is [`crate::backend::Clock`] milliseconds (window) and Unix
//! milliseconds (quota periods), so tests drive both with a manual clock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use crate::clients::Client;
use crate::config::{QuotaPeriod, TokenQuota};
use crate::usage::Endpoint;

/// Length of the sliding window for `rpm` and `tpm`.
pub const WINDOW_MS: u64 = 60_000;

/// The limits configured for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Requests per sliding 60 s.
    pub rpm: Option<u64>,
    /// Tokens per sliding 60 s.
    pub tpm: Option<u64>,
    /// Tokens per UTC day or month.
    pub token_quota: Option<TokenQuota>,
    /// Output tokens assumed when a request sets no maximum.
    pub default_max_tokens: u64,
}

impl ClientLimits {
    /// True when admission must estimate the request's tokens.
    pub fn counts_tokens(&self) -> bool {
        self.tpm.is_some() || self.token_quota.is_some()
    }
}

/// A ledger of amounts over the last [`WINDOW_MS`]: one entry per
/// millisecond that saw an admission, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Window {
    entries: VecDeque<(u64, u64)>,
    used: u64,
}

impl Window {
    /// Drops entries that left the window at `now` (an entry admitted at
    /// `t` counts while `now < t + WINDOW_MS`).
    pub fn evict(&mut self, now: u64) {
        while let Some(&(t, amount)) = self.entries.front() {
            if t.saturating_add(WINDOW_MS) > now {
                break;
            }
            self.used = self.used.saturating_sub(amount);
            self.entries.pop_front();
        }
    }

    /// The amount in the window (after [`Window::evict`]).
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Milliseconds from `now` until `amount` more fits under `limit`:
    /// `None` when it fits now. `amount` must not exceed `limit`.
    pub fn wait_for(&self, amount: u64, limit: u64, now: u64) -> Option<u64> {
        let over = self.used.saturating_add(amount).checked_sub(limit)?;
        if over == 0 {
            return None;
        }
        let mut freed = 0u64;
        for &(t, a) in &self.entries {
            freed = freed.saturating_add(a);
            if freed >= over {
                return Some(t.saturating_add(WINDOW_MS).saturating_sub(now).max(1));
            }
        }
        // Unreachable while amount <= limit: everything leaves in time.
        Some(WINDOW_MS)
    }

    /// Adds `amount` at time `t` (not before the newest entry).
    pub fn add(&mut self, t: u64, amount: u64) {
        match self.entries.back_mut() {
            Some((last, a)) if *last >= t => *a = a.saturating_add(amount),
            _ => self.entries.push_back((t, amount)),
        }
        self.used = self.used.saturating_add(amount);
    }

    /// Replaces `from` with `to` in the entry of time `t`, if that entry
    /// is still in the window.
    pub fn adjust(&mut self, t: u64, from: u64, to: u64) {
        if let Ok(i) = self.entries.binary_search_by_key(&t, |&(et, _)| et)
            && let Some((_, a)) = self.entries.get_mut(i)
        {
            let new = a.saturating_sub(from).saturating_add(to);
            self.used = self.used.saturating_sub(*a).saturating_add(new);
            *a = new;
        }
    }
}

#[derive(Debug, Default)]
struct Ledger {
    requests: Window,
    tokens: Window,
    /// Which day or month `quota_used` belongs to.
    quota_period: u64,
    quota_used: u64,
}

/// The live limit state of one client.
#[derive(Debug, Default)]
pub struct LimitState {
    ledger: Mutex<Ledger>,
}

/// What the windows and quota hold right now, for headers and the admin
/// output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Requests in the last 60 s.
    pub requests: u64,
    /// Tokens in the last 60 s.
    pub tokens: u64,
    /// Tokens used in the current quota period.
    pub quota_used: u64,
}

impl LimitState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger holds plain numbers: a panic elsewhere cannot leave it
        // in a state worse than slightly off.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current use at `now` / `unix_ms`.
    pub fn usage(&self, limits: &ClientLimits, now: u64, unix_ms: u64) -> Usage {
        let mut l = self.lock();
        l.requests.evict(now);
        l.tokens.evict(now);
        let quota_used = match limits.token_quota {
            Some(q) if l.quota_period == period_id(q.period, unix_ms) => l.quota_used,
            _ => 0,
        };
        Usage {
            requests: l.requests.used(),
            tokens: l.tokens.used(),
            quota_used,
        }
    }
}

/// Why admission refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the requests per minute.
    Rpm {
        /// The configured rpm.
        limit: u64,
        /// Until enough requests leave the window.
        retry_after_ms: u64,
    },
    /// Over the tokens per minute.
    Tpm {
        /// The configured tpm.
        limit: u64,
        /// Until enough tokens leave the window.
        retry_after_ms: u64,
    },
    /// The request alone needs more than the whole tpm.
    TooLarge {
        /// The configured tpm.
        limit: u64,
        /// The request's estimate.
        estimate: u64,
    },
    /// The token quota of the current period is used up.
    Quota {
        /// The configured quota.
        tokens: u64,
        /// Unix ms when the next period starts.
        renews_at_unix_ms: u64,
    },
}

/// What one admitted request holds against its client's tokens until its
/// usage is known. Dropping it keeps the estimate as the cost.
#[derive(Debug)]
pub struct Reservation {
    client: Arc<Client>,
    at: u64,
    estimate: u64,
    /// The quota period it was counted in, if the client has a quota.
    period: Option<u64>,
    /// The quota lease shared between replicas it was also charged to.
    shared_quota: Option<Arc<crate::shared::quota::QuotaLease>>,
}

impl Reservation {
    /// The tokens reserved.
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Charges the request to `lease` too (shared token quota), so that
    /// settling gives back to it what the response did not use.
    pub fn share_quota(&mut self, lease: Arc<crate::shared::quota::QuotaLease>) {
        self.shared_quota = Some(lease);
    }

    /// Replaces the estimate with the `tokens` really used, in the window
    /// entry of the admission time and in the quota period of admission
    /// (and in the shared quota lease, if any).
    pub fn settle(self, tokens: u64) {
        if let Some(lease) = &self.shared_quota {
            lease.settle(self.estimate, tokens);
        }
        let mut l = self.client.state.lock();
        if self.client.limits.tpm.is_some() {
            l.tokens.adjust(self.at, self.estimate, tokens);
        }
        if let Some(p) = self.period
            && l.quota_period == p
        {
            l.quota_used = l
                .quota_used
                .saturating_sub(self.estimate)
                .saturating_add(tokens);
        }
    }

    /// Keeps the estimate as the request's cost (no usage known).
    pub fn keep_estimate(self) {}
}

/// Admits one request of `client` that is estimated at `estimate` tokens,
/// at `now` (clock ms) and `unix_ms` (for quota periods). Returns the
/// reservation to settle when the client counts tokens.
///
/// # Errors
/// A [`Refusal`]; nothing is counted then.
pub fn admit(
    client: &Arc<Client>,
    estimate: u64,
    now: u64,
    unix_ms: u64,
) -> Result<Option<Reservation>, Refusal> {
    let limits = client.limits;
    if limits.rpm.is_none() && !limits.counts_tokens() {
        return Ok(None);
    }
    let mut l = client.state.lock();
    let mut period = None;
    if let Some(q) = limits.token_quota {
        let id = period_id(q.period, unix_ms);
        if l.quota_period != id {
            l.quota_period = id;
            l.quota_used = 0;
        }
        if l.quota_used >= q.tokens {
            return Err(Refusal::Quota {
                tokens: q.tokens,
                renews_at_unix_ms: next_period_start(q.period, unix_ms),
            });
        }
        period = Some(id);
    }
    if let Some(tpm) = limits.tpm
        && estimate > tpm
    {
        return Err(Refusal::TooLarge {
            limit: tpm,
            estimate,
        });
    }
    l.requests.evict(now);
    l.tokens.evict(now);
    let rpm_wait = limits
        .rpm
        .and_then(|limit| l.requests.wait_for(1, limit, now).map(|w| (limit, w)));
    let tpm_wait = limits
        .tpm
        .and_then(|limit| l.tokens.wait_for(estimate, limit, now).map(|w| (limit, w)));
    // Both over: the longer wait is the one that makes the retry succeed.
    match (rpm_wait, tpm_wait) {
        (Some((limit, r)), t) if t.is_none_or(|(_, w)| r >= w) => {
            return Err(Refusal::Rpm {
                limit,
                retry_after_ms: r,
            });
        }
        (_, Some((limit, w))) => {
            return Err(Refusal::Tpm {
                limit,
                retry_after_ms: w,
            });
        }
        _ => {}
    }
    if limits.rpm.is_some() {
        l.requests.add(now, 1);
    }
    if !limits.counts_tokens() {
        return Ok(None);
    }
    if limits.tpm.is_some() {
        l.tokens.add(now, estimate);
    }
    if period.is_some() {
        l.quota_used = l.quota_used.saturating_add(estimate);
    }
    drop(l);
    Ok(Some(Reservation {
        client: Arc::clone(client),
        at: now,
        estimate,
        period,
        shared_quota: None,
    }))
}

// ---- The estimate ------------------------------------------------------

/// What the token estimates read from a JSON request body: the output
/// caps and the prompt's parts. Parsed once per request (the pipeline
/// keeps it on its context) and shared by the client's token admission
/// ([`estimate_parsed`]) and rate-limit steering
/// ([`crate::steer::estimate`]).
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct Caps {
    /// `max_tokens` (chat, completions).
    pub max_tokens: Option<u64>,
    /// `max_completion_tokens` (chat, newer models).
    pub max_completion_tokens: Option<u64>,
    /// `max_output_tokens` (Responses).
    pub max_output_tokens: Option<u64>,
    /// `n`: choices generated.
    pub n: Option<u64>,
    /// `best_of` (legacy completions): candidates generated.
    pub best_of: Option<u64>,
    /// Chat `messages`.
    pub messages: Option<serde_json::Value>,
    /// Completions `prompt`.
    pub prompt: Option<serde_json::Value>,
    /// Embeddings or Responses `input`.
    pub input: Option<serde_json::Value>,
    /// Responses `instructions`.
    pub instructions: Option<serde_json::Value>,
    /// Tool definitions (chat, Responses).
    pub tools: Option<serde_json::Value>,
    /// Legacy chat function definitions.
    pub functions: Option<serde_json::Value>,
}

impl Caps {
    /// Parses `body`. `None` when it is not a JSON object, or a cap or
    /// `n`/`best_of` is not a non-negative integer (Azure refuses such a
    /// request; it is estimated at 0).
    pub fn parse(body: &[u8]) -> Option<Caps> {
        // An array would fill the struct's fields in order.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(body).ok()
    }

    /// The prompt's parts, for the tokenizer.
    pub fn prompt_parts(&self) -> crate::usage::estimate::PromptParts<'_> {
        crate::usage::estimate::PromptParts {
            messages: self.messages.as_ref(),
            prompt: self.prompt.as_ref(),
            input: self.input.as_ref(),
            instructions: self.instructions.as_ref(),
            tools: self.tools.as_ref(),
            functions: self.functions.as_ref(),
        }
    }
}

/// The most a request may generate, as Azure reserves it: its cap
/// (`max_completion_tokens`, else `max_tokens`, else `max_output_tokens`,
/// else `default` when it sets none) times the choices it asks for (the
/// larger of `n` and `best_of`, at least 1). Saturates instead of
/// overflowing.
pub fn output_allowance(caps: &Caps, default: u64) -> u64 {
    let out = caps
        .max_completion_tokens
        .or(caps.max_tokens)
        .or(caps.max_output_tokens)
        .unwrap_or(default);
    let times = caps.n.unwrap_or(1).max(caps.best_of.unwrap_or(1)).max(1);
    out.saturating_mul(times)
}

/// Azure-style admission estimate of a request's tokens: prompt tokens
/// plus [`output_allowance`] with `default_max_tokens`. Embeddings
/// generate nothing. A body that is not a JSON object (audio uploads, GET
/// requests) is estimated at 0: such requests count against `rpm` only.
/// `model` (the deployment) picks the tokenizer. Parses `body`; the
/// pipeline, which has parsed it already, calls [`estimate_parsed`].
pub fn estimate_tokens(path: &str, model: &str, body: &[u8], default_max_tokens: u64) -> u64 {
    estimate_parsed(
        Caps::parse(body).as_ref(),
        path,
        model,
        body.len(),
        default_max_tokens,
    )
}

/// [`estimate_tokens`] of a body already parsed into `caps` (`None`: not
/// a JSON object, estimated at 0), `body_len` bytes long.
pub fn estimate_parsed(
    caps: Option<&Caps>,
    path: &str,
    model: &str,
    body_len: usize,
    default_max_tokens: u64,
) -> u64 {
    let Some(caps) = caps else {
        return 0;
    };
    let endpoint = Endpoint::from_path(path);
    // The inference endpoints' prompts are counted with the model's
    // tokenizer; elsewhere about four bytes of JSON per token, the order
    // of Azure's own character-based estimate.
    let prompt = match endpoint {
        Some(e) => crate::usage::estimate::prompt_tokens_of(
            crate::usage::estimate::Encoding::for_model(model),
            e,
            &caps.prompt_parts(),
        ),
        None => (body_len as u64).div_ceil(4),
    };
    if endpoint == Some(Endpoint::Embeddings) {
        return prompt;
    }
    prompt.saturating_add(output_allowance(caps, default_max_tokens))
}

// ---- Calendar periods --------------------------------------------------

const DAY_MS: u64 = 86_400_000;

/// A number that changes exactly when the period rolls over.
pub(crate) fn period_id(p: QuotaPeriod, unix_ms: u64) -> u64 {
    let day = unix_ms / DAY_MS;
    match p {
        QuotaPeriod::Day => day,
        QuotaPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            y * 12 + m
        }
    }
}

/// Unix ms at which the period containing `unix_ms` ends.
pub fn next_period_start(p: QuotaPeriod, unix_ms: u64) -> u64 {
    let day = unix_ms / DAY_MS;
    match p {
        QuotaPeriod::Day => (day + 1) * DAY_MS,
        QuotaPeriod::Month => {
            let (y, m, _) = civil_from_days(day);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(ny, nm) * DAY_MS
        }
    }
}

/// Days since 1970-01-01 to (year, month 1-12, day), proleptic Gregorian
/// (Howard Hinnant's algorithm, for days on or after the epoch).
fn civil_from_days(z: u64) -> (u64, u64, u64) {
    let z = z + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// (year, month 1-12) at day 1 to days since 1970-01-01.
fn days_from_civil(y: u64, m: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y % 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::Client;
    use proptest::prelude::*;

    fn client(rpm: Option<u64>, tpm: Option<u64>, quota: Option<TokenQuota>) -> Arc<Client> {
        let mut c = Client::unlimited("t");
        c.limits = ClientLimits {
            rpm,
            tpm,
            token_quota: quota,
            default_max_tokens: 100,
        };
        Arc::new(c)
    }

    #[test]
    fn rpm_refuses_until_the_oldest_request_leaves_the_window() {
        let c = client(Some(2), None, None);
        assert!(admit(&c, 0, 1_000, 0).is_ok());
        assert!(admit(&c, 0, 5_000, 0).is_ok());
        assert_eq!(
            admit(&c, 0, 10_000, 0).unwrap_err(),
            Refusal::Rpm {
                limit: 2,
                retry_after_ms: 51_000
            }
        );
        assert!(admit(&c, 0, 60_999, 0).is_err());
        assert!(admit(&c, 0, 61_000, 0).is_ok());
    }

    #[test]
    fn tpm_waits_for_the_entry_that_frees_enough_room() {
        let c = client(None, Some(100), None);
        admit(&c, 30, 0, 0).unwrap();
        admit(&c, 30, 10_000, 0).unwrap();
        admit(&c, 30, 20_000, 0).unwrap();
        // 90 used; 50 more needs 20 freed: the first two entries.
        assert_eq!(
            admit(&c, 50, 30_000, 0).unwrap_err(),
            Refusal::Tpm {
                limit: 100,
                retry_after_ms: 40_000
            }
        );
        assert!(admit(&c, 50, 69_999, 0).is_err());
        assert!(admit(&c, 50, 70_000, 0).is_ok());
    }

    #[test]
    fn settling_replaces_the_estimate_in_the_admission_entry() {
        let c = client(None, Some(100), None);
        let r = admit(&c, 90, 0, 0).unwrap().unwrap();
        admit(&c, 5, 1, 0).unwrap();
        assert!(admit(&c, 10, 2, 0).is_err());
        r.settle(20);
        assert_eq!(c.state.usage(&c.limits, 2, 0).tokens, 25);
        assert!(admit(&c, 10, 2, 0).is_ok());
        // The settled entry still leaves 60 s after admission.
        assert_eq!(c.state.usage(&c.limits, 60_000, 0).tokens, 15);
    }

    #[test]
    fn a_request_larger_than_the_tpm_is_never_admitted() {
        let c = client(None, Some(100), None);
        assert_eq!(
            admit(&c, 101, 0, 0).unwrap_err(),
            Refusal::TooLarge {
                limit: 100,
                estimate: 101
            }
        );
        assert_eq!(c.state.usage(&c.limits, 0, 0), Usage::default());
    }

    #[test]
    fn a_refused_request_counts_nothing() {
        let c = client(Some(10), Some(100), None);
        admit(&c, 100, 0, 0).unwrap();
        assert!(admit(&c, 1, 1, 0).is_err());
        assert_eq!(c.state.usage(&c.limits, 1, 0).requests, 1);
    }

    #[test]
    fn quota_refuses_once_used_up_until_the_period_rolls_over() {
        let q = TokenQuota {
            tokens: 100,
            period: QuotaPeriod::Day,
        };
        let c = client(None, None, Some(q));
        // 2026-11-29T23:00:00Z
        let t = 1_795_993_200_000;
        let r = admit(&c, 60, 0, t).unwrap().unwrap();
        r.settle(120);
        assert_eq!(
            admit(&c, 1, 1, t + 1).unwrap_err(),
            Refusal::Quota {
                tokens: 100,
                renews_at_unix_ms: 1_795_996_800_000
            }
        );
        assert!(admit(&c, 1, 2, 1_795_996_800_000).is_ok());
    }

    #[test]
    fn calendar_periods_roll_over_at_midnight_utc() {
        // 2026-11-29T12:00:00Z -> 2026-12-01T00:00:00Z
        assert_eq!(
            next_period_start(QuotaPeriod::Month, 1_795_953_600_000),
            1_796_083_200_000
        );
        // 2026-12-15 -> 2027-01-01
        assert_eq!(
            next_period_start(QuotaPeriod::Month, 1_797_292_800_000),
            1_798_761_600_000
        );
        assert_eq!(
            next_period_start(QuotaPeriod::Day, 1_795_953_600_000),
            1_795_996_800_000
        );
        assert_ne!(
            period_id(QuotaPeriod::Month, 1_796_083_199_999),
            period_id(QuotaPeriod::Month, 1_796_083_200_000)
        );
    }

    #[test]
    fn estimates_like_azure() {
        use crate::usage::estimate::prompt_tokens;
        let chat = "/openai/deployments/gpt-4o/chat/completions";
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":16,"n":2}"#;
        let p = prompt_tokens(Endpoint::Chat, "gpt-4o", body);
        assert!(p > 0);
        assert_eq!(estimate_tokens(chat, "gpt-4o", body, 100), p + 32);
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(estimate_tokens(chat, "gpt-4o", body, 100), p + 100);
        let emb = "/openai/deployments/e/embeddings";
        let body = br#"{"input":"hi there","max_tokens":50}"#;
        assert_eq!(
            estimate_tokens(emb, "e", body, 100),
            prompt_tokens(Endpoint::Embeddings, "e", body)
        );
        let images = "/openai/deployments/d/images/generations";
        let body = br#"{"prompt":"a cat"}"#;
        assert_eq!(
            estimate_tokens(images, "d", body, 100),
            (body.len() as u64).div_ceil(4) + 100
        );
        assert_eq!(estimate_tokens("/audio", "d", b"RIFF....", 100), 0);
        assert_eq!(estimate_tokens("/x", "d", b"", 100), 0);
        assert_eq!(estimate_tokens(chat, "gpt-4o", b"[16, 2]", 100), 0);
        assert_eq!(
            estimate_tokens(chat, "gpt-4o", br#"{"max_tokens":"16"}"#, 100),
            0
        );
    }

    #[test]
    fn output_allowance_takes_the_first_cap_set_times_the_most_choices() {
        let caps = |body: &[u8]| Caps::parse(body).unwrap();
        assert_eq!(output_allowance(&caps(b"{}"), 100), 100);
        assert_eq!(output_allowance(&caps(br#"{"max_tokens":7}"#), 100), 7);
        // max_completion_tokens wins over max_tokens, which wins over
        // max_output_tokens.
        let all = br#"{"max_tokens":7,"max_completion_tokens":5,"max_output_tokens":3}"#;
        assert_eq!(output_allowance(&caps(all), 100), 5);
        let two = br#"{"max_tokens":7,"max_output_tokens":3}"#;
        assert_eq!(output_allowance(&caps(two), 100), 7);
        assert_eq!(
            output_allowance(&caps(br#"{"max_output_tokens":3}"#), 100),
            3
        );
        // The larger of n and best_of; 0 counts as 1.
        assert_eq!(
            output_allowance(&caps(br#"{"max_tokens":7,"n":3}"#), 100),
            21
        );
        let both = br#"{"max_tokens":7,"n":2,"best_of":4}"#;
        assert_eq!(output_allowance(&caps(both), 100), 28);
        assert_eq!(output_allowance(&caps(br#"{"n":0}"#), 100), 100);
        assert_eq!(output_allowance(&caps(br#"{"max_tokens":null}"#), 100), 100);
        let huge = format!(r#"{{"max_tokens":{},"n":2}}"#, u64::MAX);
        assert_eq!(output_allowance(&caps(huge.as_bytes()), 100), u64::MAX);
    }

    proptest! {
        /// Whatever the sequence, the window never holds more than the
        /// limit, and a refusal's wait is exactly when the request fits.
        #[test]
        fn the_window_never_exceeds_its_limit_and_waits_are_exact(
            steps in prop::collection::vec((0u64..5_000, 1u64..60), 1..200)
        ) {
            let limit = 100;
            let c = client(None, Some(limit), None);
            let mut now = 1;
            for (dt, amount) in steps {
                now += dt;
                match admit(&c, amount, now, 0) {
                    Ok(_) => {}
                    Err(Refusal::Tpm { retry_after_ms, .. }) => {
                        let probe = client(None, Some(limit), None);
                        {
                            let src = c.state.lock();
                            let mut dst = probe.state.lock();
                            dst.tokens = src.tokens.clone();
                        }
                        prop_assert!(admit(&probe, amount, now + retry_after_ms - 1, 0).is_err());
                        prop_assert!(admit(&probe, amount, now + retry_after_ms, 0).is_ok());
                    }
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
                prop_assert!(c.state.usage(&c.limits, now, 0).tokens <= limit);
            }
        }
    }
}
