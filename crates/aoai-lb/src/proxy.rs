//! The gateway: the public face of the request pipeline.
//!
//! [`Gateway::handle`] runs one request through the phases of
//! [`crate::pipeline`] and answers any phase's error itself. Errors the
//! gateway answers are [`ProxyError`]s; responses from instances go back
//! with their status, headers (minus hop-by-hop) and body unchanged.
//! The admin listener's views of live state are here too.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};

use crate::backend::{Clock, Unavailable};
use crate::config::Config;
use crate::credential::{AzureEnv, TokenCache, TokenState};
use crate::error::GatewayError;
#[cfg(doc)]
use crate::error::ProxyError;
use crate::pipeline::{self, RequestCtx, account};
use crate::relay::ClientBody;
use crate::secret::Secret;
use crate::state::GatewayState;

pub use crate::pipeline::GATEWAY_REQUEST_ID;
pub use crate::stream::{ProxyBody, full_body};

/// The load-balancing gateway. Cheap to clone (one `Arc`).
///
/// The live state sits behind an [`ArcSwap`]: each request takes the state
/// current when it arrives and keeps it to the end, response body
/// included, so a reload ([`Gateway::replace`]) applies to new requests at
/// once and never to one already running.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<ArcSwap<GatewayState>>,
}

/// One instance in the `/admin/backends` document. Never holds a key or URL.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    /// Configured name.
    pub name: String,
    /// Lower is preferred.
    pub priority: u32,
    /// Share within the priority.
    pub weight: f64,
    /// Requests being served now.
    pub in_flight: u32,
    /// Time left in a 429 cooldown; 0 when not cooling.
    pub cooldown_remaining_ms: u64,
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Time-to-headers EWMA in ms (0 before any response).
    pub latency_ewma_ms: f64,
    /// Attempts started.
    pub requests: u64,
    /// 5xx, timeouts, connection and auth failures.
    pub failures: u64,
    /// One entry per upstream deployment used so far, with its predicted
    /// rate-limit room ([`crate::steer`]).
    pub lanes: Vec<crate::steer::LaneStatus>,
    /// Why the instance cannot take requests now, in words (`null` when it
    /// can): a cooldown, an open breaker, or no Entra ID token.
    pub unavailable: Option<String>,
    /// The Entra ID credential, for instances that use one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialStatus>,
}

/// An Entra ID credential in the `/admin/backends` document. Never holds a
/// token or secret.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CredentialStatus {
    /// `type:client_id` (`managed_identity:system`, ...).
    pub name: String,
    /// `pending` (first fetch under way), `ok` or `failing`.
    pub state: TokenState,
    /// Seconds until the current token expires (0 without one).
    pub token_expires_in_s: u64,
    /// The last fetch error while failing.
    pub last_error: Option<String>,
}

/// One client in the `/admin/clients` document. Never holds a key or a
/// key hash.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientStatus {
    /// Configured name (`default` for `API_KEY`).
    pub name: String,
    /// Deployments it may use; `null` = all.
    pub deployments: Option<Vec<String>>,
    /// Priority groups it may use; `null` = all.
    pub priorities: Option<Vec<u32>>,
    /// Whether its `x-ms-spillover-deployment` header is passed on.
    pub spillover: bool,
    /// Requests per minute: limit and current use; `null` = unlimited.
    pub rpm: Option<WindowStatus>,
    /// Tokens per minute: limit and current use; `null` = unlimited.
    pub tpm: Option<WindowStatus>,
    /// The token quota and what is left of it; `null` = none.
    pub token_quota: Option<QuotaStatus>,
}

/// A sliding 60 s limit and its use now.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WindowStatus {
    /// The configured limit.
    pub limit: u64,
    /// Used in the last 60 s.
    pub used: u64,
    /// `limit - used`, at least 0.
    pub remaining: u64,
}

/// A token quota and its use in the current period.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuotaStatus {
    /// Tokens per period.
    pub tokens: u64,
    /// `day` or `month` (UTC).
    pub period: &'static str,
    /// Used in the current period.
    pub used: u64,
    /// `tokens - used`, at least 0.
    pub remaining: u64,
    /// When the next period starts (RFC 3339, UTC).
    pub renews_at: String,
}

impl Gateway {
    /// Builds a gateway on the real clock. `client_key` `None` is
    /// unauthenticated mode (only when the operator explicitly allowed it).
    ///
    /// # Errors
    /// Bad extra CA file, TLS set-up failure, more than 128 instances, or a
    /// host/key that cannot be a header value.
    pub fn new(config: Arc<Config>, client_key: Option<Secret>) -> Result<Gateway, GatewayError> {
        Self::with_clock(config, client_key, Clock::new())
    }

    /// [`Gateway::new`] on a given clock (a manual one in tests).
    ///
    /// # Errors
    /// As [`Gateway::new`].
    pub fn with_clock(
        config: Arc<Config>,
        client_key: Option<Secret>,
        clock: Clock,
    ) -> Result<Gateway, GatewayError> {
        Self::with_tracing(config, client_key, clock, None)
    }

    /// [`Gateway::with_clock`] exporting traces through `tracing`
    /// ([`crate::otel`]); `None` is tracing off.
    ///
    /// # Errors
    /// As [`Gateway::new`].
    pub fn with_tracing(
        config: Arc<Config>,
        client_key: Option<Secret>,
        clock: Clock,
        tracing: Option<Arc<crate::otel::Tracing>>,
    ) -> Result<Gateway, GatewayError> {
        Self::with_env(
            config,
            client_key,
            clock,
            &AzureEnv::from_process(),
            tracing,
        )
    }

    /// [`Gateway::with_tracing`] with the Azure identity variables of `env`
    /// instead of the process environment.
    ///
    /// # Errors
    /// As [`Gateway::new`], and when an instance's Entra ID credential
    /// cannot work in `env`.
    pub fn with_env(
        config: Arc<Config>,
        client_key: Option<Secret>,
        clock: Clock,
        env: &AzureEnv,
        tracing: Option<Arc<crate::otel::Tracing>>,
    ) -> Result<Gateway, GatewayError> {
        let mut state = GatewayState::with_env(config, client_key, clock, env)?;
        state.tracing = tracing;
        Ok(Gateway {
            inner: Arc::new(ArcSwap::from_pointee(state)),
        })
    }

    /// The distinct Entra ID token caches in use now, in order of first use.
    pub fn credentials(&self) -> Vec<Arc<TokenCache>> {
        let gw = self.state();
        let mut out: Vec<Arc<TokenCache>> = Vec::new();
        for b in &gw.backends {
            if let Some(t) = &b.token
                && !out.iter().any(|o| Arc::ptr_eq(o, t))
            {
                out.push(Arc::clone(t));
            }
        }
        out
    }

    /// The state new requests use now (configuration, instances, clock).
    pub fn state(&self) -> Arc<GatewayState> {
        self.inner.load_full()
    }

    /// Makes `next` the state of every request from now on. Requests
    /// already running finish on the state they started with.
    pub fn replace(&self, next: GatewayState) {
        self.inner.store(Arc::new(next));
    }

    /// Per-instance live state for the admin listener.
    pub fn backends(&self) -> Vec<BackendStatus> {
        let gw = self.state();
        let now = gw.clock.now_ms();
        gw.backends
            .iter()
            .map(|b| BackendStatus {
                name: b.name().to_owned(),
                priority: b.config.priority,
                weight: b.config.weight,
                in_flight: b.in_flight(),
                cooldown_remaining_ms: b.cooling_until(now).map_or(0, |u| u - now),
                breaker: b.breaker_state(now).as_str(),
                latency_ewma_ms: b.latency_ewma_ms(),
                requests: b.requests(),
                failures: b.failures(),
                unavailable: match gw.selector.health().check(b, now) {
                    Ok(()) => None,
                    Err(Unavailable::Cooling(_)) => Some("cooling down after a 429".to_owned()),
                    Err(Unavailable::BreakerOpen) => Some("circuit breaker open".to_owned()),
                    Err(Unavailable::NoToken) => b
                        .token
                        .as_ref()
                        .and_then(|t| t.unavailable_reason())
                        .or_else(|| Some("no valid Entra ID token".to_owned())),
                },
                credential: b.token.as_ref().map(|t| CredentialStatus {
                    name: t.label.clone(),
                    state: t.state(),
                    token_expires_in_s: t.expires_in_secs(),
                    last_error: t.last_error().map(|e| e.to_string()),
                }),
                lanes: crate::steer::lane_status(b, now),
            })
            .collect()
    }

    /// Per-client limits and use for the admin listener.
    pub fn clients(&self) -> Vec<ClientStatus> {
        let gw = self.state();
        let (now, unix) = (gw.clock.now_ms(), gw.clock.unix_ms());
        gw.clients
            .all()
            .iter()
            .map(|c| {
                let l = c.limits;
                let used = c.state.usage(&l, now, unix);
                let window = |limit: Option<u64>, used: u64| {
                    limit.map(|limit| WindowStatus {
                        limit,
                        used,
                        remaining: limit.saturating_sub(used),
                    })
                };
                ClientStatus {
                    name: c.name.to_string(),
                    deployments: c.deployments.as_ref().map(|d| d.iter().cloned().collect()),
                    priorities: c.priorities.as_ref().map(|p| p.iter().copied().collect()),
                    spillover: c.spillover,
                    rpm: window(l.rpm, used.requests),
                    tpm: window(l.tpm, used.tokens),
                    token_quota: l.token_quota.map(|q| QuotaStatus {
                        tokens: q.tokens,
                        period: crate::clients::period_str(q.period),
                        used: used.quota_used,
                        remaining: q.tokens.saturating_sub(used.quota_used),
                        renews_at: crate::log::rfc3339_ms(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_millis(
                                    crate::limits::next_period_start(q.period, unix),
                                ),
                        ),
                    }),
                }
            })
            .collect()
    }

    /// The gateway's part of the `/admin/status` document.
    pub fn status(&self) -> crate::status::GatewayStatus {
        let gw = self.state();
        crate::status::gateway_status(&gw.backends, &gw.draining, &gw.rates, gw.clock.now_ms())
    }

    /// Sets the per-lane gauges to the prediction now (at each scrape).
    pub fn refresh_lane_gauges(&self) {
        let gw = self.state();
        crate::steer::refresh_gauges(&gw.backends, gw.clock.now_ms());
    }

    /// True while at least one instance could take a request.
    pub fn any_available(&self) -> bool {
        let gw = self.state();
        let now = gw.clock.now_ms();
        gw.backends
            .iter()
            .any(|b| gw.selector.health().check(b, now).is_ok())
    }

    /// Answers one client request. Never fails: every error becomes an
    /// OpenAI-shaped response ([`ProxyError`]).
    pub async fn handle(&self, req: Request<ClientBody>) -> Response<ProxyBody> {
        // Held to the end of the request; the body keeps what it needs.
        let state = self.inner.load_full();
        let gw = &*state;
        let mut ctx = RequestCtx::new(req);
        // Tracing on: the ids this request's spans and upstream
        // `traceparent` headers use, drawn once here; the spans themselves
        // are built from the record when it is written.
        ctx.record.trace = gw.tracing.as_ref().map(|t| t.begin(&ctx.parts.headers));
        match pipeline::run(gw, &mut ctx).await {
            Ok(response) => response,
            Err(e) => account::reject(gw, &mut ctx, e),
        }
    }
}
