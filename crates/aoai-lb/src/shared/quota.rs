//! Client quotas across replicas (issue 12, part 3): leases taken from a
//! shared bucket. Not wired into admission yet: every replica still admits
//! against its own windows.

use std::time::Duration;

use tokio::sync::Notify;

use super::{RedisConfig, Shared};
use crate::state::GatewayState;

/// How often leases are checked and topped up.
pub const TOP_UP_INTERVAL: Duration = Duration::from_millis(200);

/// The replica's leases.
pub struct Quotas {
    /// Woken when a lease runs low before the next tick.
    pub wanted: Notify,
}

impl Quotas {
    pub(crate) fn new(_cfg: &RedisConfig) -> Self {
        Self {
            wanted: Notify::new(),
        }
    }

    /// Forgets every lease (after an outage the shared bucket moved on).
    pub fn reset_leases(&self) {}

    /// The leases for `/admin/redis`.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Tops up the leases that run low.
pub(crate) async fn top_up(_shared: &Shared, _gw: &GatewayState) {}
