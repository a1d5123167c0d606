//! What every request shares: the configuration and the live state built
//! from it (instances, selector, upstream clients, clock, affinity table).
//!
//! [`GatewayState`] sits below the request pipeline: the phases
//! ([`crate::pipeline`]) and the failover loop ([`crate::send`]) read it,
//! and it knows nothing of either, so no module cycle runs through it.

use std::sync::Arc;

use crate::affinity::AffinityTable;
use crate::backend::{Backend, Clock};
use crate::config::Config;
use crate::error::GatewayError;
use crate::secret::Secret;
use crate::select::{MAX_INSTANCES, Selector};
use crate::upstream::{self, UpstreamClient};

/// Shared state of a gateway.
pub struct GatewayState {
    /// The configuration it was built with.
    pub config: Arc<Config>,
    /// The key clients must present; `None` in unauthenticated mode.
    pub client_key: Option<Secret>,
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
        let selector = Selector::new(&backends);
        let client = upstream::build_client(&config, true)?;
        let client_h1 = upstream::build_client(&config, false)?;
        Ok(GatewayState {
            config,
            client_key,
            backends,
            selector,
            client,
            client_h1,
            clock,
            affinity: Arc::new(AffinityTable::default()),
        })
    }
}
