//! Phase 3: may this client have this now.
//!
//! Checks the identified client's permissions and limits before any
//! instance is contacted:
//! - [`permit`]: a deployment outside the client's `deployments` is a 403;
//!   a client-sent `x-ms-spillover-deployment` is removed unless the
//!   client may spill over (see [`crate::clients`]);
//! - [`admit`]: the token quota (403 `QuotaExceeded`), then `rpm` and
//!   `tpm` (429 with the exact wait, or a 429 that says a request is larger
//!   than the whole `tpm`). An admitted request's token reservation is kept
//!   in [`RequestCtx::reservation`] and settled by the account phase.
//!
//! [`rate_headers`] writes the client's own `x-ratelimit-*` figures.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::clients::Client;
use crate::error::{ProxyError, RateLimit};
use crate::limits::{self, Refusal};
use crate::log::rfc3339_ms;
use crate::state::GatewayState;

use super::RequestCtx;

/// Azure's request header asking a PTU deployment to spill over.
pub static SPILLOVER_DEPLOYMENT: HeaderName = HeaderName::from_static("x-ms-spillover-deployment");

/// Refuses a deployment the client may not use and removes a spillover
/// request the client may not make.
///
/// # Errors
/// [`ProxyError::DeploymentNotAllowed`] (403).
pub fn permit(_gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    let Some(client) = &ctx.client else {
        return Ok(());
    };
    if let Some(dep) = ctx.route.deployment.as_deref()
        && !client.may_use(dep)
    {
        return Err(ProxyError::DeploymentNotAllowed {
            client: client.name.clone(),
            deployment: dep.to_owned(),
        });
    }
    if !client.spillover {
        ctx.parts.headers.remove(&SPILLOVER_DEPLOYMENT);
    }
    Ok(())
}

/// Admits the request against the client's quota, `rpm` and `tpm`.
///
/// # Errors
/// [`ProxyError::QuotaExceeded`] (403), [`ProxyError::ClientRateLimited`]
/// or [`ProxyError::RequestTooLarge`] (429). Nothing is counted then.
pub fn admit(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    let Some(client) = &ctx.client else {
        return Ok(());
    };
    if !client.is_limited() {
        return Ok(());
    }
    let estimate = if client.limits.counts_tokens() {
        limits::estimate_tokens(
            ctx.parts.uri.path(),
            ctx.route.deployment.as_deref().unwrap_or(""),
            &ctx.body,
            client.limits.default_max_tokens,
        )
    } else {
        0
    };
    match limits::admit(client, estimate, gw.clock.now_ms(), gw.clock.unix_ms()) {
        Ok(r) => {
            ctx.reservation = r;
            Ok(())
        }
        Err(refusal) => Err(refused(client, refusal)),
    }
}

fn refused(client: &Client, refusal: Refusal) -> ProxyError {
    let name = client.name.clone();
    match refusal {
        Refusal::Rpm {
            limit,
            retry_after_ms,
        } => ProxyError::ClientRateLimited {
            client: name,
            limit: RateLimit::Requests(limit),
            retry_after_ms,
        },
        Refusal::Tpm {
            limit,
            retry_after_ms,
        } => ProxyError::ClientRateLimited {
            client: name,
            limit: RateLimit::Tokens(limit),
            retry_after_ms,
        },
        Refusal::TooLarge { limit, estimate } => ProxyError::RequestTooLarge {
            client: name,
            tpm: limit,
            estimate,
        },
        Refusal::Quota {
            tokens,
            renews_at_unix_ms,
        } => ProxyError::QuotaExceeded {
            client: name,
            tokens,
            period: client
                .limits
                .token_quota
                .map_or("period", |q| crate::clients::period_str(q.period)),
            renews_at: rfc3339_ms(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(renews_at_unix_ms),
            ),
        },
    }
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");

/// Sets `x-ratelimit-limit-*` and `x-ratelimit-remaining-*` to the
/// client's own figures for each of `rpm` (requests) and `tpm` (tokens)
/// it has, replacing the instance's. A dimension the client has no limit
/// for keeps the instance's headers.
pub fn rate_headers(gw: &GatewayState, client: &Client, headers: &mut HeaderMap) {
    let (rpm, tpm) = (client.limits.rpm, client.limits.tpm);
    if rpm.is_none() && tpm.is_none() {
        return;
    }
    let used = client
        .state
        .usage(&client.limits, gw.clock.now_ms(), gw.clock.unix_ms());
    if let Some(limit) = rpm {
        headers.insert(LIMIT_REQUESTS.clone(), HeaderValue::from(limit));
        headers.insert(
            REMAINING_REQUESTS.clone(),
            HeaderValue::from(limit.saturating_sub(used.requests)),
        );
    }
    if let Some(limit) = tpm {
        headers.insert(LIMIT_TOKENS.clone(), HeaderValue::from(limit));
        headers.insert(
            REMAINING_TOKENS.clone(),
            HeaderValue::from(limit.saturating_sub(used.tokens)),
        );
    }
}
