//! Named clients: who may use the gateway, and with which limits.
//!
//! The optional top-level `clients` array of the configuration names each
//! client, its keys and its limits (see `docs/configuration.md`):
//!
//! ```json
//! {"name": "team-a", "key_sha256": "<hex>", "deployments": ["gpt-4o"],
//!  "rpm": 600, "tpm": 200000, "priorities": [1],
//!  "token_quota": {"tokens": 50000000, "period": "month"}}
//! ```
//!
//! Keys: `key` (the key itself), `key_sha256` (hex of its SHA-256) and
//! `key_env` (the name of an environment variable holding it) each take one
//! string or a list, and all of them together are the client's keys, so a
//! key can be rotated by listing the old and the new one for a while. Only
//! the SHA-256 of each key is kept; a presented key is hashed, looked up by
//! hash, and confirmed with a constant-time comparison.
//!
//! Microsoft Entra ID callers (see [`crate::entra`]) are matched by the
//! validated token's principal instead of a key: `entra_object_ids` lists
//! `oid` values (a user, a managed identity or a service principal) and
//! `entra_app_ids` lists `appid`/`azp` values (the calling application).
//! When a token matches one client by `oid` and another by its app, the
//! `oid` wins: it names one caller, the app possibly many. A client needs at
//! least one key or one principal.
//!
//! `API_KEY`, when set, is a key of the client named `default`. That
//! client has no limits unless the `clients` array configures one named
//! `default`, in which case `API_KEY` is added to its keys.
//!
//! Permissions are checked here ([`Client::may_use`], [`Client::allowed`]);
//! rates and quotas are counted in [`crate::limits`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};

use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth;
use crate::backend::Backend;
use crate::config::{ClientConfig, ConfigError, InstanceConfig, QuotaPeriod, TokenQuota};
use crate::error::ProxyError;
use crate::limits::{ClientLimits, LimitState};
use crate::secret::Secret;
use crate::select::IndexSet;

/// The name of the client that `API_KEY` (and, in unauthenticated mode,
/// every request without a known key) belongs to.
pub const DEFAULT_CLIENT: &str = "default";

/// Largest `max_tokens` assumed for a request that sets none, when the
/// client does not configure `default_max_tokens`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// A SHA-256 digest of a client key.
pub type KeyHash = [u8; 32];

/// The SHA-256 of `key`.
pub fn hash_key(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

// ---- The configuration as written -------------------------------------

/// One string, or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A `clients[]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClient {
    name: String,
    key: Option<OneOrMany>,
    key_sha256: Option<OneOrMany>,
    key_env: Option<OneOrMany>,
    entra_app_ids: Option<OneOrMany>,
    entra_object_ids: Option<OneOrMany>,
    deployments: Option<Vec<String>>,
    rpm: Option<u64>,
    tpm: Option<u64>,
    priorities: Option<Vec<u32>>,
    token_quota: Option<RawQuota>,
    default_max_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuota {
    tokens: u64,
    period: QuotaPeriod,
}

/// Validates the `clients` array. `env` looks up `key_env` variables.
pub(crate) fn validate(
    raw: Vec<RawClient>,
    instances: &[InstanceConfig],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ClientConfig>, ConfigError> {
    let mut names = BTreeSet::new();
    let mut owners: HashMap<KeyHash, String> = HashMap::new();
    let mut app_owners: HashMap<String, String> = HashMap::new();
    let mut object_owners: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let at = |f: &str| format!("clients[{i}].{f}");
        if !valid_name(&c.name) {
            return Err(ConfigError::new(
                at("name"),
                "must be 1 to 64 characters: letters, digits, '-', '_', '.', '@' or ':'",
            ));
        }
        if !names.insert(c.name.clone()) {
            return Err(ConfigError::new(
                at("name"),
                format!("duplicate client name {:?}", c.name),
            ));
        }
        let mut keys: Vec<(String, KeyHash)> = Vec::new();
        for (j, k) in c
            .key
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let k = k.trim();
            if k.is_empty() {
                return Err(ConfigError::new(
                    format!("clients[{i}].key[{j}]"),
                    "must not be empty",
                ));
            }
            keys.push((format!("clients[{i}].key"), hash_key(k.as_bytes())));
        }
        for (j, h) in c
            .key_sha256
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let field = format!("clients[{i}].key_sha256[{j}]");
            let hash = parse_sha256(&h).ok_or_else(|| {
                ConfigError::new(
                    field.clone(),
                    "must be 64 hex digits: the SHA-256 of the key",
                )
            })?;
            keys.push((field, hash));
        }
        for (j, var) in c
            .key_env
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let field = format!("clients[{i}].key_env[{j}]");
            let value = env(var.trim())
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        field.clone(),
                        format!("environment variable {:?} is not set or empty", var.trim()),
                    )
                })?;
            keys.push((field, hash_key(value.trim().as_bytes())));
        }
        let entra_app_ids = principal_ids(
            c.entra_app_ids,
            &format!("clients[{i}].entra_app_ids"),
            &c.name,
            &mut app_owners,
        )?;
        let entra_object_ids = principal_ids(
            c.entra_object_ids,
            &format!("clients[{i}].entra_object_ids"),
            &c.name,
            &mut object_owners,
        )?;
        if keys.is_empty() && entra_app_ids.is_empty() && entra_object_ids.is_empty() {
            return Err(ConfigError::new(
                format!("clients[{i}]"),
                "needs at least one key (key, key_sha256 or key_env) or Entra ID principal (entra_app_ids or entra_object_ids)",
            ));
        }
        let mut hashes = Vec::with_capacity(keys.len());
        for (field, hash) in keys {
            if let Some(owner) = owners.get(&hash) {
                return Err(ConfigError::new(
                    field,
                    format!("the same key is already a key of client {owner:?}"),
                ));
            }
            owners.insert(hash, c.name.clone());
            hashes.push(hash);
        }
        let deployments = match c.deployments {
            None => None,
            Some(list) if list.is_empty() => {
                return Err(ConfigError::new(
                    at("deployments"),
                    "must name at least one deployment (omit the field to allow every deployment)",
                ));
            }
            Some(list) => {
                for (j, d) in list.iter().enumerate() {
                    if d.trim().is_empty() {
                        return Err(ConfigError::new(
                            format!("clients[{i}].deployments[{j}]"),
                            "must not be empty",
                        ));
                    }
                }
                Some(list.into_iter().collect::<BTreeSet<_>>())
            }
        };
        let positive = |f: &str, v: Option<u64>| match v {
            Some(0) => Err(ConfigError::new(at(f), "must be greater than 0")),
            v => Ok(v),
        };
        let rpm = positive("rpm", c.rpm)?;
        let tpm = positive("tpm", c.tpm)?;
        let default_max_tokens =
            positive("default_max_tokens", c.default_max_tokens)?.unwrap_or(DEFAULT_MAX_TOKENS);
        let priorities = match c.priorities {
            None => None,
            Some(p) if p.is_empty() => {
                return Err(ConfigError::new(
                    at("priorities"),
                    "must name at least one priority group (omit the field to allow all)",
                ));
            }
            Some(p) => {
                for (j, g) in p.iter().enumerate() {
                    if !instances.iter().any(|inst| inst.priority == *g) {
                        return Err(ConfigError::new(
                            format!("clients[{i}].priorities[{j}]"),
                            format!("no instance has priority {g}"),
                        ));
                    }
                }
                Some(p.into_iter().collect::<BTreeSet<_>>())
            }
        };
        let token_quota = match c.token_quota {
            None => None,
            Some(q) if q.tokens == 0 => {
                return Err(ConfigError::new(
                    at("token_quota.tokens"),
                    "must be greater than 0",
                ));
            }
            Some(q) => Some(TokenQuota {
                tokens: q.tokens,
                period: q.period,
            }),
        };
        out.push(ClientConfig {
            name: c.name,
            key_hashes: hashes,
            entra_app_ids,
            entra_object_ids,
            deployments,
            rpm,
            tpm,
            priorities,
            token_quota,
            default_max_tokens,
        });
    }
    Ok(out)
}

/// The GUIDs of `entra_app_ids` or `entra_object_ids` (`field`),
/// lower-cased. Each may belong to one client only: two clients claiming
/// one principal would make its limits depend on configuration order.
fn principal_ids(
    raw: Option<OneOrMany>,
    field: &str,
    client: &str,
    owners: &mut HashMap<String, String>,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for (j, id) in raw
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let id = id.trim().to_ascii_lowercase();
        let at = format!("{field}[{j}]");
        if !crate::entra::is_guid(&id) {
            return Err(ConfigError::new(
                at,
                "must be a GUID (the application or object ID, not a display name)",
            ));
        }
        if let Some(owner) = owners.get(&id) {
            return Err(ConfigError::new(
                at,
                format!("already listed for client {owner:?}"),
            ));
        }
        owners.insert(id.clone(), client.to_owned());
        out.push(id);
    }
    Ok(out)
}

/// Client names go into metric labels and log lines: short and plain.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':'))
}

fn parse_sha256(text: &str) -> Option<KeyHash> {
    let t = text.trim().as_bytes();
    if t.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(t.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

// ---- Live clients ------------------------------------------------------

/// One client of the gateway, with its permissions and live limit state.
pub struct Client {
    /// The configured name; used in logs and metric labels.
    pub name: Arc<str>,
    /// Client-facing deployments it may use; `None` = all.
    pub deployments: Option<BTreeSet<String>>,
    /// Priority groups it may use; `None` = all.
    pub priorities: Option<BTreeSet<u32>>,
    /// Instances it may not be sent to (their priority is not allowed).
    pub excluded: IndexSet,
    /// Whether a client-sent `x-ms-spillover-deployment` is passed on.
    pub spillover: bool,
    /// Its configured limits.
    pub limits: ClientLimits,
    /// Its live windows and quota; shared with the same-named client of a
    /// reloaded configuration, so a reload does not reset them.
    pub state: Arc<LimitState>,
    /// `aoai_lb_requests_total{instance, code, client}` handles per
    /// instance index, made on first use.
    requests: Box<[OnceLock<[metrics::Counter; 5]>]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Client {
    fn new(cfg: &ClientConfig, backends: &[Arc<Backend>], state: Arc<LimitState>) -> Self {
        let mut excluded = IndexSet::default();
        if let Some(p) = &cfg.priorities {
            for b in backends {
                if !p.contains(&b.config.priority) {
                    excluded.insert(b.index);
                }
            }
        }
        // Spilling over means going past the lowest-numbered (preferred)
        // priority group: allowed when the client may use any other group.
        let lowest = backends.iter().map(|b| b.config.priority).min();
        let spillover = match (&cfg.priorities, lowest) {
            (None, _) | (_, None) => true,
            (Some(p), Some(low)) => p.iter().any(|g| *g != low),
        };
        Self {
            name: Arc::from(cfg.name.as_str()),
            deployments: cfg.deployments.clone(),
            priorities: cfg.priorities.clone(),
            excluded,
            spillover,
            limits: ClientLimits {
                rpm: cfg.rpm,
                tpm: cfg.tpm,
                token_quota: cfg.token_quota,
                default_max_tokens: cfg.default_max_tokens,
            },
            state,
            requests: (0..backends.len()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// A client with no limits (`default` from `API_KEY`, or everyone in
    /// unauthenticated mode).
    pub fn unlimited(name: &str) -> Self {
        Self::unlimited_over(name, crate::select::MAX_INSTANCES)
    }

    fn unlimited_over(name: &str, instances: usize) -> Self {
        Self {
            name: Arc::from(name),
            deployments: None,
            priorities: None,
            excluded: IndexSet::default(),
            spillover: true,
            limits: ClientLimits {
                rpm: None,
                tpm: None,
                token_quota: None,
                default_max_tokens: DEFAULT_MAX_TOKENS,
            },
            state: Arc::default(),
            requests: (0..instances).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Whether it may use the client-facing `deployment`.
    pub fn may_use(&self, deployment: &str) -> bool {
        self.deployments
            .as_ref()
            .is_none_or(|d| d.contains(deployment))
    }

    /// Whether it may be sent to `backend` (its priority group).
    pub fn allowed(&self, backend: &Backend) -> bool {
        !self.excluded.contains(backend.index)
    }

    /// Counts a response from `backend` in `aoai_lb_requests_total`.
    pub fn count_response(&self, backend: &Backend, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        if let Some(cell) = self.requests.get(backend.index) {
            cell.get_or_init(|| {
                ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|code| {
                    metrics::counter!(
                        crate::metrics::REQUESTS_TOTAL,
                        "instance" => backend.name().to_owned(),
                        "code" => code,
                        "client" => self.name.to_string()
                    )
                })
            })[class]
                .increment(1);
        }
    }

    /// True when any rate or quota applies.
    pub fn is_limited(&self) -> bool {
        self.limits.rpm.is_some() || self.limits.tpm.is_some() || self.limits.token_quota.is_some()
    }
}

/// Every client, and how a request's key finds its client. `Debug` shows
/// the clients, never a key hash.
pub struct Clients {
    by_hash: HashMap<KeyHash, Arc<Client>>,
    /// `entra_app_ids`, lower-case.
    by_app_id: HashMap<String, Arc<Client>>,
    /// `entra_object_ids`, lower-case.
    by_object_id: HashMap<String, Arc<Client>>,
    /// In configuration order, `default` first when it exists.
    all: Vec<Arc<Client>>,
    /// Unauthenticated mode: the client of requests without a known key.
    open: Option<Arc<Client>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("all", &self.all)
            .finish_non_exhaustive()
    }
}

/// Building the client table failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientsError {
    /// `API_KEY` equals a key configured for a named client.
    #[error("API_KEY: the same key is configured for client {0:?}; use one or the other")]
    ApiKeyTaken(String),
}

impl Clients {
    /// The table for `configs` plus `API_KEY` (`client_key`). With
    /// `open`, a request presenting no known key is served as client
    /// `default` (unauthenticated mode) instead of being refused. A client
    /// named as one in `previous` (the table before a reload) keeps its
    /// window and quota use.
    ///
    /// # Errors
    /// [`ClientsError::ApiKeyTaken`].
    pub fn new(
        configs: &[ClientConfig],
        client_key: Option<&Secret>,
        open: bool,
        backends: &[Arc<Backend>],
        previous: Option<&Clients>,
    ) -> Result<Self, ClientsError> {
        Self::with_principals(configs, client_key, open, false, backends, previous)
    }

    /// [`Clients::new`], also making client `default` (unlimited unless
    /// configured) when `any_principal` is set: that is the client of a
    /// valid Entra ID token matching no client under the `entra` block's
    /// `allow_any_principal`.
    ///
    /// # Errors
    /// [`ClientsError::ApiKeyTaken`].
    pub fn with_principals(
        configs: &[ClientConfig],
        client_key: Option<&Secret>,
        open: bool,
        any_principal: bool,
        backends: &[Arc<Backend>],
        previous: Option<&Clients>,
    ) -> Result<Self, ClientsError> {
        let state_of = |name: &str| {
            previous
                .and_then(|p| p.all.iter().find(|c| &*c.name == name))
                .map_or_else(Arc::default, |c| Arc::clone(&c.state))
        };
        let mut by_hash = HashMap::new();
        let mut by_app_id = HashMap::new();
        let mut by_object_id = HashMap::new();
        let mut all = Vec::with_capacity(configs.len() + 1);
        let mut default = None;
        for cfg in configs {
            let c = Arc::new(Client::new(cfg, backends, state_of(&cfg.name)));
            for h in &cfg.key_hashes {
                by_hash.insert(*h, Arc::clone(&c));
            }
            for id in &cfg.entra_app_ids {
                by_app_id.insert(id.clone(), Arc::clone(&c));
            }
            for id in &cfg.entra_object_ids {
                by_object_id.insert(id.clone(), Arc::clone(&c));
            }
            if cfg.name == DEFAULT_CLIENT {
                default = Some(Arc::clone(&c));
            }
            all.push(c);
        }
        let needs_default = client_key.is_some() || open || any_principal;
        let default = match default {
            Some(d) => Some(d),
            None if needs_default => {
                let mut d = Client::unlimited_over(DEFAULT_CLIENT, backends.len());
                d.state = state_of(DEFAULT_CLIENT);
                let d = Arc::new(d);
                all.insert(0, Arc::clone(&d));
                Some(d)
            }
            None => None,
        };
        if let (Some(key), Some(d)) = (client_key, &default) {
            let h = hash_key(key.expose().as_bytes());
            if let Some(owner) = by_hash.get(&h)
                && !Arc::ptr_eq(owner, d)
            {
                return Err(ClientsError::ApiKeyTaken(owner.name.to_string()));
            }
            by_hash.insert(h, Arc::clone(d));
        }
        Ok(Self {
            by_hash,
            by_app_id,
            by_object_id,
            all,
            open: if open { default } else { None },
        })
    }

    /// Every client, `default` first when it exists.
    pub fn all(&self) -> &[Arc<Client>] {
        &self.all
    }

    /// True when no key at all is configured.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The client whose key the request presents (`api-key` first, then
    /// `Authorization: Bearer`; the first known key wins).
    ///
    /// # Errors
    /// [`ProxyError::Unauthorized`] when no header carries a known key
    /// (and the gateway is not in unauthenticated mode).
    pub fn identify(&self, headers: &HeaderMap) -> Result<Arc<Client>, ProxyError> {
        for presented in auth::presented_keys(headers) {
            let h = hash_key(presented);
            // The map finds the candidate by hash; the final comparison is
            // constant-time, so timing says nothing about the stored hash.
            if let Some((stored, client)) = self.by_hash.get_key_value(&h)
                && bool::from(stored.ct_eq(&h))
            {
                return Ok(Arc::clone(client));
            }
        }
        match &self.open {
            Some(c) => Ok(Arc::clone(c)),
            None => Err(ProxyError::Unauthorized),
        }
    }
}

impl Clients {
    /// The client a validated Entra ID principal is listed for: by `oid`
    /// first, then by `appid`/`azp` (GUIDs compared case-insensitively).
    /// `None` when no client lists it. Principal IDs are not secrets, so a
    /// plain lookup is fine here.
    pub fn for_principal(&self, principal: &crate::entra::Principal) -> Option<Arc<Client>> {
        let find = |map: &HashMap<String, Arc<Client>>, id: &Option<String>| {
            id.as_ref()
                .and_then(|id| map.get(&id.trim().to_ascii_lowercase()))
                .cloned()
        };
        find(&self.by_object_id, &principal.object_id)
            .or_else(|| find(&self.by_app_id, &principal.app_id))
    }

    /// The client named `default`, when it exists.
    pub fn default_client(&self) -> Option<Arc<Client>> {
        self.all
            .iter()
            .find(|c| &*c.name == DEFAULT_CLIENT)
            .cloned()
    }
}

/// The label of a quota period.
pub fn period_str(p: QuotaPeriod) -> &'static str {
    match p {
        QuotaPeriod::Day => "day",
        QuotaPeriod::Month => "month",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http::HeaderValue;

    fn doc(clients: serde_json::Value) -> String {
        serde_json::json!({
            "instances": [
                {"name": "ptu", "url": "http://127.0.0.1:9", "api_key": "k", "priority": 1},
                {"name": "paygo", "url": "http://127.0.0.1:10", "api_key": "k", "priority": 2}
            ],
            "clients": clients,
        })
        .to_string()
    }

    fn err(clients: serde_json::Value) -> String {
        Config::from_json_env(&doc(clients), &|_| None)
            .unwrap_err()
            .to_string()
    }

    fn table(clients: serde_json::Value, api_key: Option<&str>) -> Clients {
        let env = |k: &str| (k == "TEAM_KEY").then(|| "from-env".to_owned());
        let c = Config::from_json_env(&doc(clients), &env).unwrap();
        let backends: Vec<Arc<Backend>> = c
            .instances
            .iter()
            .enumerate()
            .map(|(i, inst)| Arc::new(Backend::new(i, inst.clone(), &c.circuit_breaker).unwrap()))
            .collect();
        Clients::new(
            &c.clients,
            api_key.map(Secret::new).as_ref(),
            false,
            &backends,
            None,
        )
        .unwrap()
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        h
    }

    fn name(t: &Clients, key: &str) -> Option<String> {
        t.identify(&bearer(key)).ok().map(|c| c.name.to_string())
    }

    #[test]
    fn finds_a_client_by_any_of_its_keys() {
        let sha = hex_sha("hashed-key");
        let t = table(
            serde_json::json!([
                {"name": "a", "key": ["old-key", "new-key"]},
                {"name": "b", "key_sha256": sha},
                {"name": "c", "key_env": "TEAM_KEY"}
            ]),
            Some("seed-key"),
        );
        assert_eq!(name(&t, "old-key").as_deref(), Some("a"));
        assert_eq!(name(&t, "new-key").as_deref(), Some("a"));
        assert_eq!(name(&t, "hashed-key").as_deref(), Some("b"));
        assert_eq!(name(&t, "from-env").as_deref(), Some("c"));
        assert_eq!(name(&t, "seed-key").as_deref(), Some("default"));
        assert_eq!(name(&t, "nope"), None);
        assert_eq!(t.all()[0].name.as_ref(), "default");
        assert!(!t.all()[0].is_limited());
    }

    #[test]
    fn api_key_joins_a_configured_default_client() {
        let t = table(
            serde_json::json!([{"name": "default", "key": "other", "rpm": 5}]),
            Some("seed-key"),
        );
        let c = t.identify(&bearer("seed-key")).unwrap();
        assert_eq!(c.limits.rpm, Some(5));
        assert_eq!(t.all().len(), 1);
    }

    #[test]
    fn refuses_api_key_equal_to_a_named_clients_key() {
        let env = |_: &str| None;
        let c = Config::from_json_env(
            &doc(serde_json::json!([{"name": "a", "key": "same"}])),
            &env,
        )
        .unwrap();
        let e = Clients::new(&c.clients, Some(&Secret::new("same")), false, &[], None).unwrap_err();
        assert_eq!(e, ClientsError::ApiKeyTaken("a".into()));
        assert!(!e.to_string().contains("same\""));
    }

    #[test]
    fn priorities_decide_instances_and_spillover() {
        let t = table(
            serde_json::json!([
                {"name": "ptu-only", "key": "k1", "priorities": [1]},
                {"name": "both", "key": "k2", "priorities": [1, 2]}
            ]),
            None,
        );
        let only = t.identify(&bearer("k1")).unwrap();
        assert!(only.excluded.contains(1) && !only.excluded.contains(0));
        assert!(!only.spillover);
        let both = t.identify(&bearer("k2")).unwrap();
        assert!(both.spillover);
        assert_eq!(both.excluded, IndexSet::default());
    }

    #[test]
    fn bad_client_entries_name_the_field() {
        let cases = [
            (
                serde_json::json!([{"name": "", "key": "k"}]),
                "clients[0].name: ",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k"}, {"name": "a", "key": "j"}]),
                "clients[1].name: duplicate",
            ),
            (
                serde_json::json!([{"name": "a"}]),
                "clients[0]: needs at least one key",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k"}, {"name": "b", "key": ["j", "k"]}]),
                "clients[1].key: the same key",
            ),
            (
                serde_json::json!([{"name": "a", "key_sha256": "abc"}]),
                "clients[0].key_sha256[0]: must be 64 hex digits",
            ),
            (
                serde_json::json!([{"name": "a", "key_env": "MISSING_VAR"}]),
                "clients[0].key_env[0]: environment variable \"MISSING_VAR\" is not set",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k", "rpm": 0}]),
                "clients[0].rpm: ",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k", "deployments": []}]),
                "clients[0].deployments: ",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k", "priorities": [3]}]),
                "clients[0].priorities[0]: no instance has priority 3",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k", "token_quota": {"tokens": 5, "period": "week"}}]),
                "clients[0].token_quota.period: ",
            ),
            (
                serde_json::json!([{"name": "a", "key": "k", "tmp": 5}]),
                "clients[0]",
            ),
            (
                serde_json::json!([{"name": "a", "entra_app_ids": ["my-app"]}]),
                "clients[0].entra_app_ids[0]: must be a GUID",
            ),
            (
                serde_json::json!([
                    {"name": "a", "entra_object_ids": [OID]},
                    {"name": "b", "entra_object_ids": ["x", OID]}
                ]),
                "clients[1].entra_object_ids[0]: must be a GUID",
            ),
            (
                serde_json::json!([
                    {"name": "a", "entra_object_ids": [OID]},
                    {"name": "b", "entra_object_ids": [OID.to_uppercase()]}
                ]),
                "clients[1].entra_object_ids[0]: already listed for client \"a\"",
            ),
            (
                serde_json::json!([{"name": "a", "entra_object_ids": [OID]}]),
                "clients[0].entra_object_ids: needs the top-level entra block",
            ),
            (
                serde_json::json!([{"name": "a", "entra_app_ids": []}]),
                "clients[0]: needs at least one key",
            ),
        ];
        for (clients, want) in cases {
            let e = err(clients.clone());
            assert!(e.starts_with(want), "{clients}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn never_echoes_a_key_of_the_wrong_type() {
        let e = err(serde_json::json!([{"name": "a", "key": 123456789}]));
        assert!(e.starts_with("clients[0]"), "{e}");
        assert!(!e.contains("123456789"), "{e}");
    }

    const OID: &str = "7e3a0000-0000-4000-8000-0000000000a1";
    const APP: &str = "ba7c0000-0000-4000-8000-0000000000b2";

    fn principal(oid: Option<&str>, app: Option<&str>) -> crate::entra::Principal {
        crate::entra::Principal {
            object_id: oid.map(str::to_owned),
            app_id: app.map(str::to_owned),
        }
    }

    #[test]
    fn finds_a_principals_client_by_object_id_before_app_id() {
        let mut d: serde_json::Value = serde_json::from_str(&doc(serde_json::json!([
            {"name": "by-oid", "entra_object_ids": OID.to_uppercase()},
            {"name": "by-app", "entra_app_ids": [APP], "key": "k"}
        ])))
        .unwrap();
        d["entra"] = serde_json::json!({"tenant_id": "9c1c4e5a-7d0b-4c6e-9a43-5e1f2b3c4d5e"});
        let c = Config::from_json_env(&d.to_string(), &|_| None).unwrap();
        assert_eq!(c.clients[0].entra_object_ids, [OID]);
        assert!(c.clients[0].key_hashes.is_empty());
        let t = Clients::new(&c.clients, None, false, &[], None).unwrap();
        let name = |p| t.for_principal(&p).map(|c| c.name.to_string());
        assert_eq!(
            name(principal(Some(OID), Some(APP))).as_deref(),
            Some("by-oid")
        );
        assert_eq!(name(principal(None, Some(APP))).as_deref(), Some("by-app"));
        assert_eq!(
            name(principal(
                Some("0b990000-0000-4000-8000-0000000000d4"),
                Some(&APP.to_uppercase())
            ))
            .as_deref(),
            Some("by-app")
        );
        assert_eq!(
            name(principal(
                Some("0b990000-0000-4000-8000-0000000000d4"),
                None
            )),
            None
        );
        assert!(t.default_client().is_none());
        let any = Clients::with_principals(&c.clients, None, false, true, &[], None).unwrap();
        assert_eq!(
            any.default_client().map(|c| c.name.to_string()).as_deref(),
            Some("default")
        );
        assert!(!any.default_client().unwrap().is_limited());
    }

    fn hex_sha(key: &str) -> String {
        hash_key(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
