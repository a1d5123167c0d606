//! Named clients: who may use the gateway, and with which limits.

/// One client of the gateway.
#[derive(Debug)]
pub struct Client {
    /// The configured name; used in logs and metric labels.
    pub name: Box<str>,
}
