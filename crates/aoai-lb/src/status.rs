//! The operator's view of one replica: the `/admin/status` JSON document and
//! the page at `/` of the admin listener that polls it.
//!
//! The page is one HTML file embedded in the binary (`status.html`: inline
//! CSS and JS, no external asset). Its Content-Security-Policy allows that
//! one script and that one style block by their SHA-256 hashes, computed
//! here from the embedded file, and nothing else: no other script, no
//! inline event handler, no `eval`, no connection but to this origin, no
//! framing. The page only reads; it has no control that changes anything.
//!
//! The document shows instance names and live state, the configuration's
//! hash and load time, never a key, a backend URL or a client key.

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::activity::{self, BUCKET_MS, Counts, Unavailability};
use crate::backend::{Backend, BreakerState};
use crate::log::rfc3339_ms;

/// The page, as embedded.
pub const PAGE: &str = include_str!("status.html");

/// The `Content-Security-Policy` for [`PAGE`]: its inline script and style
/// are allowed by hash, everything else is refused.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash_source(inline(PAGE, "script")),
            hash_source(inline(PAGE, "style")),
        )
    })
}

/// The text between the first `<tag>` and the next `</tag>`: what the
/// browser hashes to check it against the policy.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    page.find(&open)
        .map(|i| &page[i + open.len()..])
        .and_then(|rest| rest.find(&close).map(|j| &rest[..j]))
        .unwrap_or("")
}

fn hash_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// Which replica this is: Container Apps' `CONTAINER_APP_REPLICA_NAME`,
/// else `HOSTNAME`, else `/etc/hostname`, else empty. Each replica keeps its
/// own cooldowns, so the page says whose it shows.
pub fn replica() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        ["CONTAINER_APP_REPLICA_NAME", "HOSTNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|s| s.trim().chars().take(128).collect())
            .unwrap_or_default()
    })
}

/// The configuration in use, as shown to the operator.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigInfo {
    /// First 16 hex digits of the SHA-256 of the document's bytes (what
    /// `sha256sum` prints for the file).
    pub hash: String,
    /// When this configuration was loaded (RFC 3339, UTC).
    pub loaded_at: String,
    /// 1 at start-up, plus one per reload applied.
    pub generation: u64,
    /// `OPENAI_INSTANCES`, `file <path>`, `demo`.
    pub source: String,
    /// The last reload attempt, if there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadStatus>,
}

/// The last reload attempt.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// `applied` or `rejected` (`aoai_lb_config_reloads_total{outcome}`).
    pub outcome: &'static str,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// `SIGHUP` or `poll`.
    pub trigger: &'static str,
    /// Why a document was rejected: the same line as the log's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Fields that differ but need a restart; their running values stay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_needed: Option<Vec<&'static str>>,
}

impl ConfigInfo {
    /// The configuration loaded now, first generation.
    pub fn new(hash: &str, source: String) -> Self {
        Self {
            hash: hash.to_owned(),
            loaded_at: rfc3339_ms(SystemTime::now()),
            generation: 1,
            source,
            last_reload: None,
        }
    }
}

/// The parts of the document that belong to the process, not the gateway.
#[derive(Debug, Clone, Copy)]
pub struct ServerInfo {
    /// When the process started serving.
    pub started: SystemTime,
    /// Shutdown has begun.
    pub draining: bool,
}

/// One instance on the page. Never holds a key or a URL.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub name: String,
    pub priority: u32,
    pub weight: f64,
    pub in_flight: u32,
    /// `ok`, `cooling`, `breaker_open`, `half_open`, or `draining` for an
    /// instance removed by a reload that still has requests in flight.
    pub state: &'static str,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Time left in a 429 cooldown; 0 when not cooling.
    pub cooldown_remaining_ms: u64,
    /// The last 429 and what it said, if there was one.
    pub last_throttle: Option<ThrottleStatus>,
    pub latency_ewma_ms: f64,
    /// Attempts started.
    pub requests: u64,
    /// 5xx, timeouts, connection and key failures.
    pub failures: u64,
    /// Attempts per [`BUCKET_MS`] bucket over the last few minutes, oldest
    /// first, as `[ok, throttled, failed]`; the last bucket is the current.
    pub history: Vec<[u32; 3]>,
    /// Recent periods when the instance was skipped.
    pub unavailable: Vec<IntervalStatus>,
}

/// The last 429 of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct ThrottleStatus {
    /// How long ago it arrived.
    pub ago_ms: u64,
    pub status: u16,
    /// The cooldown the gateway derived from it.
    pub cooldown_ms: u64,
    /// The rate-limit headers it carried, as `[name, value]` pairs in the
    /// order the cooldown reads them (`retry-after-ms` first).
    pub headers: Vec<(&'static str, String)>,
}

/// A period of unavailability relative to now: `until_ago_ms` is negative
/// while it lasts.
#[derive(Debug, Clone, Serialize)]
pub struct IntervalStatus {
    pub kind: Unavailability,
    pub from_ago_ms: i64,
    pub until_ago_ms: i64,
}

fn signed(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// The status of one instance at `now` (gateway clock), its history up to
/// `history_now` ([`activity::history_now_ms`]).
pub fn instance(b: &Backend, now: u64, history_now: u64, draining: bool) -> InstanceStatus {
    let cooldown = b.cooling_until(now).map_or(0, |u| u - now);
    let breaker = b.breaker_state(now);
    let state = if draining {
        "draining"
    } else if cooldown > 0 {
        "cooling"
    } else if b.token.as_ref().is_some_and(|t| !t.usable()) {
        // An Entra ID credential without a valid token.
        "no_token"
    } else {
        match breaker {
            BreakerState::Closed => "ok",
            BreakerState::Open => "breaker_open",
            BreakerState::HalfOpen => "half_open",
        }
    };
    let act = b.activity();
    let window = BUCKET_MS * activity::BUCKETS as u64;
    InstanceStatus {
        name: b.name().to_owned(),
        priority: b.config.priority,
        weight: b.config.weight,
        in_flight: b.in_flight(),
        state,
        breaker: breaker.as_str(),
        cooldown_remaining_ms: cooldown,
        last_throttle: act.last_throttle().map(|t| ThrottleStatus {
            ago_ms: now.saturating_sub(t.at_ms),
            status: t.status,
            cooldown_ms: t.cooldown_ms,
            headers: t.headers,
        }),
        latency_ewma_ms: b.latency_ewma_ms(),
        requests: b.requests(),
        failures: b.failures(),
        history: act
            .history(history_now)
            .into_iter()
            .map(
                |Counts {
                     ok,
                     throttled,
                     failed,
                 }| [ok, throttled, failed],
            )
            .collect(),
        unavailable: act
            .intervals(now.saturating_sub(window))
            .into_iter()
            .map(|i| IntervalStatus {
                kind: i.kind,
                from_ago_ms: signed(now) - signed(i.from_ms),
                until_ago_ms: signed(now) - signed(i.until_ms),
            })
            .collect(),
    }
}

/// What the gateway contributes to the document: its instances and, when
/// it has them, per-client and per-deployment rates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStatus {
    /// Width of a history bucket ([`BUCKET_MS`]).
    pub bucket_ms: u64,
    /// How far into its bucket the newest history entry is.
    pub bucket_elapsed_ms: u64,
    pub instances: Vec<InstanceStatus>,
    /// Per client: present once named clients are configured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<RateRow>,
    /// Per client-facing deployment name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deployments: Vec<RateRow>,
}

/// Request and token rates of one client or deployment over the last
/// minute.
#[derive(Debug, Clone, Serialize)]
pub struct RateRow {
    pub name: String,
    pub requests_per_min: u64,
    /// Absent while token usage is not counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_min: Option<u64>,
    /// Requests refused by the gateway in the last minute (429/403 of a
    /// client's limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_per_min: Option<u64>,
}

/// Buckets summed for a "per minute" rate: the current one and the 11
/// before it, 55 to 60 s.
const RATE_BUCKETS: u64 = 12;
/// Most names tracked per kind; later names count under `(other)`, so a
/// client sending many made-up deployment names cannot grow the table.
pub const MAX_RATE_NAMES: usize = 256;

/// Requests, tokens and refusals in 5 s buckets for one name.
#[derive(Default)]
struct RateRing {
    buckets: [RateBucket; RATE_BUCKETS as usize],
}

#[derive(Default)]
struct RateBucket {
    epoch: std::sync::atomic::AtomicU64,
    requests: std::sync::atomic::AtomicU64,
    tokens: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
}

impl RateRing {
    fn add(&self, now: u64, requests: u64, tokens: u64, rejected: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let epoch = now / BUCKET_MS;
        let b = &self.buckets[(epoch % RATE_BUCKETS) as usize];
        let seen = b.epoch.load(Acquire);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, AcqRel, Acquire)
                .is_ok()
        {
            b.requests.store(0, Relaxed);
            b.tokens.store(0, Relaxed);
            b.rejected.store(0, Relaxed);
        }
        b.requests.fetch_add(requests, Relaxed);
        b.tokens.fetch_add(tokens, Relaxed);
        b.rejected.fetch_add(rejected, Relaxed);
    }

    fn sum(&self, now: u64) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let current = now / BUCKET_MS;
        let mut t = (0, 0, 0);
        for b in &self.buckets {
            let e = b.epoch.load(Acquire);
            if e <= current && current - e < RATE_BUCKETS {
                t.0 += b.requests.load(Relaxed);
                t.1 += b.tokens.load(Relaxed);
                t.2 += b.rejected.load(Relaxed);
            }
        }
        t
    }
}

type RateTable = std::sync::RwLock<std::collections::HashMap<Box<str>, Arc<RateRing>>>;

/// Request and token rates per client and per client-facing deployment
/// over the last minute, for the status page. Recorded once per request
/// when it is settled; lives as long as the process (a reload keeps it).
/// The hot path takes a read lock and bumps atomics; a write lock only for
/// a name seen for the first time.
#[derive(Default)]
pub struct Rates {
    clients: RateTable,
    deployments: RateTable,
    /// Whether any request has carried token usage (else the page has no
    /// token column to show).
    tokens_seen: std::sync::atomic::AtomicBool,
}

impl Rates {
    /// Records one request of `client` for `deployment` that the gateway
    /// `rejected` itself or that used `tokens` (`None`: not known).
    pub fn record(
        &self,
        client: Option<&str>,
        deployment: Option<&str>,
        tokens: Option<u64>,
        rejected: bool,
    ) {
        let now = activity::history_now_ms();
        if tokens.is_some() {
            self.tokens_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (req, tok, rej) = (1, tokens.unwrap_or(0), u64::from(rejected));
        if let Some(c) = client {
            ring(&self.clients, c).add(now, req, tok, rej);
        }
        if let Some(d) = deployment {
            ring(&self.deployments, d).add(now, req, tok, rej);
        }
    }

    /// Rows per client and per deployment with traffic in the last minute,
    /// busiest first.
    pub fn rows(&self) -> (Vec<RateRow>, Vec<RateRow>) {
        let now = activity::history_now_ms();
        let tokens = self.tokens_seen.load(std::sync::atomic::Ordering::Relaxed);
        (
            rows(&self.clients, now, tokens),
            rows(&self.deployments, now, tokens),
        )
    }
}

fn ring(table: &RateTable, name: &str) -> Arc<RateRing> {
    let read = table
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(r) = read.get(name) {
        return Arc::clone(r);
    }
    drop(read);
    let mut write = table
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key: &str = if write.len() >= MAX_RATE_NAMES && !write.contains_key(name) {
        "(other)"
    } else {
        name
    };
    Arc::clone(write.entry(key.into()).or_default())
}

fn rows(table: &RateTable, now: u64, tokens: bool) -> Vec<RateRow> {
    let read = table
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out: Vec<RateRow> = read
        .iter()
        .filter_map(|(name, ring)| {
            let (requests, toks, rejected) = ring.sum(now);
            (requests > 0).then(|| RateRow {
                name: name.to_string(),
                requests_per_min: requests,
                tokens_per_min: tokens.then_some(toks),
                rejected_per_min: Some(rejected),
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.requests_per_min
            .cmp(&a.requests_per_min)
            .then_with(|| a.name.cmp(&b.name))
    });
    out
}

/// The whole `/admin/status` document.
#[derive(Debug, Serialize)]
struct Document<'a> {
    version: &'static str,
    replica: &'static str,
    started_at: String,
    uptime_s: u64,
    draining: bool,
    config: &'a ConfigInfo,
    #[serde(flatten)]
    gateway: GatewayStatus,
}

/// Renders `/admin/status`.
pub fn document(server: ServerInfo, config: &ConfigInfo, gateway: GatewayStatus) -> Vec<u8> {
    let doc = Document {
        version: env!("CARGO_PKG_VERSION"),
        replica: replica(),
        started_at: rfc3339_ms(server.started),
        uptime_s: SystemTime::now()
            .duration_since(server.started)
            .map_or(0, |d| d.as_secs()),
        draining: server.draining,
        config,
        gateway,
    };
    serde_json::to_vec(&doc).unwrap_or_else(|_| b"{}".to_vec())
}

/// The gateway's part for `backends` at `now`, followed by the removed
/// instances in `draining` that still have requests in flight, and the
/// per-client and per-deployment `rates`.
pub fn gateway_status(
    backends: &[Arc<Backend>],
    draining: &[Arc<Backend>],
    rates: &Rates,
    now: u64,
) -> GatewayStatus {
    let (clients, deployments) = rates.rows();
    let history_now = activity::history_now_ms();
    let live = backends
        .iter()
        .map(|b| instance(b, now, history_now, false));
    let leaving = draining
        .iter()
        .filter(|b| b.in_flight() > 0)
        .map(|b| instance(b, now, history_now, true));
    GatewayStatus {
        bucket_ms: BUCKET_MS,
        bucket_elapsed_ms: history_now % BUCKET_MS,
        instances: live.chain(leaving).collect(),
        clients,
        deployments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn rates_count_the_last_minute_per_client_and_deployment() {
        let r = Rates::default();
        r.record(Some("team-a"), Some("gpt-4o"), None, false);
        r.record(Some("team-a"), Some("gpt-4o"), None, true);
        r.record(Some("team-b"), Some("embed"), None, false);
        let (clients, deployments) = r.rows();
        assert_eq!(clients[0].name, "team-a");
        assert_eq!(clients[0].requests_per_min, 2);
        assert_eq!(clients[0].rejected_per_min, Some(1));
        assert_eq!(clients[0].tokens_per_min, None, "no usage seen yet");
        assert_eq!(deployments.len(), 2);
        r.record(None, Some("gpt-4o"), Some(120), false);
        let (_, deployments) = r.rows();
        assert_eq!(deployments[0].requests_per_min, 3);
        assert_eq!(deployments[0].tokens_per_min, Some(120));
    }

    #[test]
    fn made_up_deployment_names_cannot_grow_the_rate_table() {
        let r = Rates::default();
        for i in 0..MAX_RATE_NAMES + 50 {
            r.record(None, Some(&format!("d{i}")), None, true);
        }
        let (_, deployments) = r.rows();
        assert_eq!(deployments.len(), MAX_RATE_NAMES + 1);
        let other = deployments.iter().find(|d| d.name == "(other)").unwrap();
        assert_eq!(other.requests_per_min, 50);
    }

    #[test]
    fn a_rate_bucket_from_a_minute_ago_is_not_counted() {
        let ring = RateRing::default();
        ring.add(1_000, 5, 0, 0);
        assert_eq!(ring.sum(1_000 + BUCKET_MS * (RATE_BUCKETS - 1)).0, 5);
        assert_eq!(ring.sum(1_000 + BUCKET_MS * RATE_BUCKETS).0, 0);
    }

    #[test]
    fn the_policy_allows_exactly_the_embedded_script_and_style() {
        let csp = content_security_policy();
        let script = inline(PAGE, "script");
        let style = inline(PAGE, "style");
        assert!(script.len() > 1000, "the page has its script inline");
        assert!(style.len() > 100, "the page has its style inline");
        assert!(csp.contains(&format!("script-src '{}'", hash_source(script))));
        assert!(csp.contains(&format!("style-src '{}'", hash_source(style))));
        assert!(csp.starts_with("default-src 'none'"));
        assert!(!csp.contains("unsafe"));
        // Exactly one of each, so the hash covers all the code there is.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_has_no_inline_handlers() {
        let lower = PAGE.to_ascii_lowercase();
        for bad in [
            "http://",
            "https://",
            " src=",
            " href=",
            "style=\"",
            " onclick",
            " onload",
            "eval(",
            "innerhtml",
            "document.write",
        ] {
            assert!(!lower.contains(bad), "{bad:?} in the page");
        }
    }

    #[test]
    fn shows_a_cooling_instance_with_its_429_and_no_key() {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"secret-key-zz"}]}"#,
        )
        .unwrap();
        let b = Arc::new(Backend::new(0, c.instances[0].clone(), &c.circuit_breaker).unwrap());
        let mut h = http::HeaderMap::new();
        h.insert("retry-after-ms", http::HeaderValue::from_static("60000"));
        b.cool_down(1_000, 60_000);
        b.activity().throttled(1_000, 429, 60_000, &h);
        b.count_attempt(crate::backend::Outcome::Throttled);
        let s = gateway_status(&[b], &[], &Rates::default(), 11_000);
        let i = &s.instances[0];
        assert_eq!(i.state, "cooling");
        assert_eq!(i.cooldown_remaining_ms, 50_000);
        let t = i.last_throttle.as_ref().unwrap();
        assert_eq!((t.ago_ms, t.status), (10_000, 429));
        assert_eq!(t.headers, vec![("retry-after-ms", "60000".to_owned())]);
        assert_eq!(i.unavailable[0].from_ago_ms, 10_000);
        assert_eq!(i.unavailable[0].until_ago_ms, -50_000);
        // The attempt is in the newest bucket, or the one before if a
        // bucket boundary passed in between.
        let throttled: u32 = i.history.iter().rev().take(2).map(|c| c[1]).sum();
        assert_eq!(throttled, 1);
        let doc = document(
            ServerInfo {
                started: SystemTime::now(),
                draining: false,
            },
            &ConfigInfo::new(&c.digest, "OPENAI_INSTANCES".into()),
            s,
        );
        let text = String::from_utf8(doc).unwrap();
        assert!(!text.contains("secret-key-zz"), "{text}");
        assert!(!text.contains("127.0.0.1:9"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["config"]["hash"].as_str().unwrap().len(), 16);
        assert_eq!(v["instances"][0]["name"], "a");
        assert!(v.get("clients").is_none(), "absent until there are clients");
    }
}
