//! What every request shares: the configuration and the live state built
//! from it (instances, selector, upstream clients, clock, affinity table).
//!
//! [`GatewayState`] sits below the request pipeline: the phases
//! ([`crate::pipeline`]) and the failover loop ([`crate::send`]) read it,
//! and it knows nothing of either, so no module cycle runs through it.

use std::sync::Arc;

use crate::affinity::AffinityTable;
use crate::backend::{Backend, Clock};
use crate::clients::Clients;
use crate::config::{BackendCredential, Config};
use crate::credential::{self, AzureEnv, TokenAuth, TokenCache};
use crate::entra::EntraValidator;
use crate::error::GatewayError;
use crate::secret::Secret;
use crate::select::{MAX_INSTANCES, Selector};
use crate::upstream::{self, UpstreamClient};

/// Shared state of a gateway.
pub struct GatewayState {
    /// The configuration it was built with.
    pub config: Arc<Config>,
    /// `API_KEY`, kept to rebuild [`GatewayState::clients`] on a reload.
    pub client_key: Option<Secret>,
    /// The clients and their keys (`API_KEY` is client `default`).
    pub clients: Clients,
    /// Instances in configuration order.
    pub backends: Vec<Arc<Backend>>,
    /// The instance selector.
    pub selector: Selector,
    /// The pooled upstream client (HTTP/1.1 and HTTP/2 by ALPN).
    pub client: UpstreamClient,
    /// An HTTP/1.1-only client for WebSocket handshakes.
    pub client_h1: UpstreamClient,
    /// The per-thread HTTP/1 pool that proxied requests go through
    /// ([`crate::pool`]); HTTP/2 instances through [`Self::client`].
    pub upstream: Arc<crate::pool::Upstream>,
    /// Monotonic ms for cooldowns and breakers.
    pub clock: Clock,
    /// Which instance holds which stateful object.
    pub affinity: Arc<AffinityTable>,
    /// Instances removed by a reload, kept for the status page while
    /// requests they took before it finish. New requests never use them.
    pub draining: Vec<Arc<Backend>>,
    /// The Azure identity variables Entra ID credentials were resolved
    /// with (a reload resolves new ones against the same).
    pub azure_env: AzureEnv,
    /// Validation of clients' Entra ID tokens (the `entra` block).
    pub entra: Option<Arc<EntraValidator>>,
    /// Per-client and per-deployment rates for the status page; kept by a
    /// reload.
    pub rates: Arc<crate::status::Rates>,
    /// The trace exporter while tracing is on ([`crate::otel`]); `None`
    /// (the default) means no spans and no `traceparent` rewriting.
    pub tracing: Option<Arc<crate::otel::Tracing>>,
    /// State shared with other replicas through Redis (`redis` block);
    /// `None` without one. Kept by a reload.
    pub shared: Option<Arc<crate::shared::Shared>>,
}

impl GatewayState {
    /// Builds the live state for `config`, on `clock`.
    ///
    /// # Errors
    /// Bad extra CA file, TLS set-up failure, more than 128 instances, or a
    /// host/key that cannot be a header value.
    pub fn new(
        config: Arc<Config>,
        client_key: Option<Secret>,
        clock: Clock,
    ) -> Result<GatewayState, GatewayError> {
        Self::with_env(config, client_key, clock, &AzureEnv::from_process())
    }

    /// [`GatewayState::new`] with the Azure identity variables of `env`
    /// instead of the process environment.
    ///
    /// # Errors
    /// As [`GatewayState::new`], and [`GatewayError::Credential`] when an
    /// instance's `auth` cannot work in `env` (a variable is missing).
    pub fn with_env(
        config: Arc<Config>,
        client_key: Option<Secret>,
        clock: Clock,
        env: &AzureEnv,
    ) -> Result<GatewayState, GatewayError> {
        if config.instances.len() > MAX_INSTANCES {
            return Err(GatewayError::TooManyInstances { max: MAX_INSTANCES });
        }
        let client = upstream::build_client(&config, true)?;
        let client_h1 = upstream::build_client(&config, false)?;
        let pool = Arc::new(crate::pool::Upstream::new(
            upstream::build_connector(&config, true)?,
            client.clone(),
            config.upstream.pool_max_idle_per_host,
            config.upstream.pool_idle_timeout,
            config.upstream.http1 == crate::relay::Http1Server::Relay,
        ));
        let caches = token_caches(&config, env, &client, &[])?;
        let entra = entra_validator(&config, env, &client, None)?;
        let backends = config
            .instances
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Backend::new(i, c.clone(), &config.circuit_breaker)
                    .map(|mut b| {
                        b.token = caches[i].clone();
                        Arc::new(b)
                    })
                    .map_err(|field| GatewayError::InvalidHeader { index: i, field })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // No key at all means unauthenticated mode (the server refuses to
        // start that way unless the operator opted out).
        let open = client_key.is_none() && config.clients.is_empty();
        let any_principal = config.entra.as_ref().is_some_and(|e| e.allow_any_principal);
        let clients = Clients::with_principals(
            &config.clients,
            client_key.as_ref(),
            open,
            any_principal,
            &backends,
            None,
        )
        .map_err(|e| GatewayError::Clients(e.to_string()))?;
        let selector = Selector::new(&backends);
        let shared = match &config.redis {
            Some(r) => Some(
                crate::shared::Shared::new(r.clone())
                    .map_err(|e| GatewayError::Redis(e.to_string()))?,
            ),
            None => None,
        };
        Ok(GatewayState {
            config,
            client_key,
            clients,
            backends,
            selector,
            client,
            client_h1,
            upstream: pool,
            clock,
            affinity: Arc::new(AffinityTable::default()),
            draining: Vec::new(),
            azure_env: env.clone(),
            entra,
            rates: Arc::default(),
            tracing: None,
            shared,
        })
    }
}

/// One token cache per distinct Entra ID credential, indexed like the
/// instances (`None` for a key credential). A credential that one of
/// `previous` (the instances before a reload) already uses keeps its
/// cache, token included.
pub(crate) fn token_caches(
    config: &Config,
    env: &AzureEnv,
    client: &UpstreamClient,
    previous: &[Arc<Backend>],
) -> Result<Vec<Option<Arc<TokenCache>>>, GatewayError> {
    let mut distinct: Vec<(&TokenAuth, Vec<usize>)> = Vec::new();
    for (i, inst) in config.instances.iter().enumerate() {
        if let BackendCredential::Entra(auth) = &inst.credential {
            match distinct.iter_mut().find(|(a, _)| *a == auth) {
                Some((_, users)) => users.push(i),
                None => distinct.push((auth, vec![i])),
            }
        }
    }
    let mut out = vec![None; config.instances.len()];
    for (auth, users) in distinct {
        let kept = previous
            .iter()
            .find_map(|b| match (&b.config.credential, &b.token) {
                (BackendCredential::Entra(a), Some(t)) if a == auth => Some(Arc::clone(t)),
                _ => None,
            });
        if let Some(cache) = kept {
            for i in users {
                out[i] = Some(Arc::clone(&cache));
            }
            continue;
        }
        let source = credential::resolve(auth, env).map_err(|reason| GatewayError::Credential {
            index: users[0],
            reason,
        })?;
        let names = users
            .iter()
            .map(|&i| config.instances[i].name.clone())
            .collect();
        let cache = TokenCache::new(
            credential::label(auth, env),
            names,
            source,
            auth.scope.clone(),
            client.clone(),
        );
        for i in users {
            out[i] = Some(Arc::clone(&cache));
        }
    }
    Ok(out)
}

/// The client-token validator for `config.entra`, keys fetched from the
/// authority of `env`. `previous` is kept (with its key set) when the block
/// did not change.
pub(crate) fn entra_validator(
    config: &Config,
    env: &AzureEnv,
    client: &UpstreamClient,
    previous: Option<&Arc<EntraValidator>>,
) -> Result<Option<Arc<EntraValidator>>, GatewayError> {
    let Some(cfg) = &config.entra else {
        return Ok(None);
    };
    if let Some(p) = previous
        && p.config == *cfg
    {
        return Ok(Some(Arc::clone(p)));
    }
    let authority = credential::authority(env).map_err(GatewayError::Entra)?;
    Ok(Some(EntraValidator::new(
        cfg.clone(),
        &authority,
        client.clone(),
    )))
}
