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
use crate::config::Config;
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
    /// Monotonic ms for cooldowns and breakers.
    pub clock: Clock,
    /// Which instance holds which stateful object.
    pub affinity: Arc<AffinityTable>,
    /// Instances removed by a reload, kept for the status page while
    /// requests they took before it finish. New requests never use them.
    pub draining: Vec<Arc<Backend>>,
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
        if config.instances.len() > MAX_INSTANCES {
            return Err(GatewayError::TooManyInstances { max: MAX_INSTANCES });
        }
        let backends = config
            .instances
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Backend::new(i, c.clone(), &config.circuit_breaker)
                    .map(Arc::new)
                    .map_err(|field| GatewayError::InvalidHeader { index: i, field })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // No key at all means unauthenticated mode (the server refuses to
        // start that way unless the operator opted out).
        let open = client_key.is_none() && config.clients.is_empty();
        let clients = Clients::new(&config.clients, client_key.as_ref(), open, &backends, None)
            .map_err(|e| GatewayError::Clients(e.to_string()))?;
        let selector = Selector::new(&backends);
        let client = upstream::build_client(&config, true)?;
        let client_h1 = upstream::build_client(&config, false)?;
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
            clock,
            affinity: Arc::new(AffinityTable::default()),
            draining: Vec::new(),
            rates: Arc::default(),
            tracing: None,
            shared,
        })
    }
}
