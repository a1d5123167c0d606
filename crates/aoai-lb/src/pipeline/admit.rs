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

/// Admits the request against the client's quota, `rpm` and `tpm`: with
/// a `redis` block in lease mode, first against this replica's leases of
/// the shared limits (atomics only, no Redis call), then against the
/// replica's own windows.
///
/// # Errors
/// [`ProxyError::QuotaExceeded`] (403), [`ProxyError::ClientRateLimited`]
/// or [`ProxyError::RequestTooLarge`] (429). Nothing is counted then.
pub fn admit(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    // Owned: the estimate parses the body into the context.
    let Some(client) = ctx.client.clone() else {
        return Ok(());
    };
    let client = &client;
    if !client.is_limited() {
        return Ok(());
    }
    let estimate = estimate(ctx, client);
    let now = gw.clock.now_ms();
    let too_large = client.limits.tpm.is_some_and(|t| estimate > t);
    let taken = match &gw.shared {
        Some(s) if !too_large => {
            let up = s.is_up();
            let rates = s.quotas.leases() || (s.quotas.strict() && !up);
            Some(
                s.quotas
                    .take(client, estimate, now, gw.clock.unix_ms(), rates, up)
                    .map_err(|r| shared_refused(client, r))?,
            )
        }
        _ => None,
    };
    match limits::admit(client, estimate, now, gw.clock.unix_ms()) {
        Ok(mut r) => {
            if let (Some(r), Some(lease)) = (&mut r, taken.as_ref().and_then(|t| t.quota_lease())) {
                r.share_quota(lease);
            }
            ctx.reservation = r;
            Ok(())
        }
        Err(refusal) => {
            if let Some(t) = taken {
                t.give_back();
            }
            Err(refused(client, refusal))
        }
    }
}

/// With a `redis` block: when the client's token-quota lease is empty but
/// Redis has tokens left, waits for one top-up (at most
/// `redis.op_timeout_ms`). In `strict` quota mode: one atomic take of the
/// request and its estimate from the shared limits, bounded by
/// `redis.op_timeout_ms`. When Redis cannot decide in time the request
/// goes on to [`admit`] (the replica's own windows).
///
/// # Errors
/// [`ProxyError::ClientRateLimited`] (429) with Redis' wait.
pub async fn admit_strict(gw: &GatewayState, ctx: &mut RequestCtx) -> Result<(), ProxyError> {
    let (Some(client), Some(shared)) = (ctx.client.clone(), &gw.shared) else {
        return Ok(());
    };
    let client = &client;
    if client.limits.token_quota.is_some() && shared.is_up() {
        // An empty quota lease while Redis has tokens left: wait for the
        // top-up rather than refuse (rare: a lease lasts many requests).
        shared
            .quotas
            .wait_for_quota(client, shared.config().op_timeout)
            .await;
    }
    if !shared.quotas.strict() || !shared.is_up() {
        return Ok(());
    }
    if client.limits.rpm.is_none() && client.limits.tpm.is_none() {
        return Ok(());
    }
    let estimate = estimate(ctx, client);
    if client.limits.tpm.is_some_and(|t| estimate > t) {
        // Refused as too large by the replica's own check.
        return Ok(());
    }
    match crate::shared::quota::strict_take(shared, client, estimate).await {
        Ok(_) => Ok(()),
        Err(r) => Err(shared_refused(client, r)),
    }
}

fn estimate(ctx: &mut RequestCtx, client: &Client) -> u64 {
    if !client.limits.counts_tokens() {
        return 0;
    }
    ctx.parse_caps();
    limits::estimate_parsed(
        ctx.caps(),
        ctx.parts.uri.path(),
        ctx.route.deployment.as_deref().unwrap_or(""),
        ctx.body.len(),
        client.limits.default_max_tokens,
    )
}

fn shared_refused(client: &Client, r: crate::shared::quota::SharedRefusal) -> ProxyError {
    use crate::shared::quota::SharedRefusal;
    let (limit, retry_after_ms) = match r {
        SharedRefusal::Rpm {
            limit,
            retry_after_ms,
        } => (RateLimit::Requests(limit), retry_after_ms),
        SharedRefusal::Tpm {
            limit,
            retry_after_ms,
        } => (RateLimit::Tokens(limit), retry_after_ms),
        SharedRefusal::QuotaLeaseShort {
            tokens,
            retry_after_ms,
        } => (RateLimit::QuotaLease(tokens), retry_after_ms),
        SharedRefusal::Quota {
            tokens,
            renews_at_unix_ms,
        } => {
            return refused(
                client,
                Refusal::Quota {
                    tokens,
                    renews_at_unix_ms,
                },
            );
        }
    };
    ProxyError::ClientRateLimited {
        client: client.name.clone(),
        limit,
        retry_after_ms,
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
