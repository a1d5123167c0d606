//! The optional `redis` block of the configuration document: parsing,
//! defaults and validation. Every mistake ends in one
//! [`ConfigError`](crate::config::ConfigError) naming the field
//! (`redis.url: ...`); the password is never read from the document itself
//! and never printed.

use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::secret::Secret;

/// How client quotas are shared between replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaMode {
    /// Each replica takes leases (small slices of the shared bucket) in the
    /// background and admits locally from them: no Redis call per request,
    /// never above the limit, at most one lease per replica left unused.
    #[default]
    Lease,
    /// One atomic Redis call per request: exact, at the price of one round
    /// trip on every limited request (and local-only admission while Redis
    /// is unreachable).
    Strict,
}

/// Whether `redis.url` is a Redis Cluster (the OSS cluster protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterMode {
    /// `"auto"` (default): asks the endpoint (`INFO cluster`) at the first
    /// successful connect and uses the cluster protocol when it reports
    /// `cluster_enabled:1`.
    #[default]
    Auto,
    /// `true`: always the cluster protocol (`CLUSTER SLOTS`, `MOVED`/`ASK`).
    On,
    /// `false`: always one server, never asked.
    Off,
}

/// The validated `redis` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` or `rediss://host:port[/db]` (TLS, rustls).
    /// Holds no credentials, so it can be logged.
    pub url: url::Url,
    /// ACL user name (`AUTH user password`); `None` = the default user.
    pub username: Option<String>,
    /// `password` from the document (which then is a secret, like the
    /// instances' keys), or read at start-up from the environment variable
    /// named by `password_env`; `None` = no `AUTH`.
    pub password: Option<Secret>,
    /// Put in front of every key and channel, so that several gateways (or
    /// environments) can share one Redis. Default `aoai-lb:`.
    pub key_prefix: String,
    /// TCP connect plus TLS handshake plus `AUTH`. Default 1 s.
    pub connect_timeout: Duration,
    /// Any background command (publish, poll, affinity writes, lease
    /// top-ups). Default 250 ms.
    pub op_timeout: Duration,
    /// The one call a request may wait on: looking up an object id this
    /// replica does not know. Default 20 ms.
    pub lookup_timeout: Duration,
    /// How often shared cooldowns are polled (the backstop behind pub/sub),
    /// Redis health is checked and leases are topped up. Default 1 s.
    pub sync_interval: Duration,
    /// Apply other replicas' cooldowns as soon as they are published.
    /// Default true; false leaves only the poll.
    pub pubsub: bool,
    /// Share cooldowns after 429s. Default true.
    pub share_cooldowns: bool,
    /// Share object-id affinity. Default true.
    pub share_affinity: bool,
    /// Share client rpm/tpm/token quotas. Default true.
    pub share_quotas: bool,
    /// How quotas are shared. Default [`QuotaMode::Lease`].
    pub quota_mode: QuotaMode,
    /// With `rediss://`: a PEM file of the CA certificate(s) to trust
    /// instead of the public web PKI roots (a private CA, a self-signed
    /// test server). `None` = the web PKI roots. Read at start-up: a
    /// missing or certificate-less file stops it.
    pub ca_file: Option<std::path::PathBuf>,
    /// Standalone or Redis Cluster. Default [`ClusterMode::Auto`]. A
    /// cluster has only database 0: a database number in `url` is refused
    /// with `true` and ignored when `auto` finds a cluster.
    pub cluster: ClusterMode,
}

/// The block as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    url: Option<String>,
    username: Option<String>,
    password: Option<Secret>,
    password_env: Option<String>,
    key_prefix: Option<String>,
    connect_timeout_ms: Option<u64>,
    op_timeout_ms: Option<u64>,
    lookup_timeout_ms: Option<u64>,
    sync_interval_ms: Option<u64>,
    pubsub: Option<bool>,
    #[serde(default)]
    share: RawShare,
    quota_mode: Option<QuotaMode>,
    ca_file: Option<std::path::PathBuf>,
    cluster: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShare {
    cooldowns: Option<bool>,
    affinity: Option<bool>,
    quotas: Option<bool>,
}

fn ms(field: &str, value: Option<u64>, default: u64, max: u64) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_millis(default)),
        Some(0) => Err(ConfigError::new(field, "must be greater than 0")),
        Some(v) if v > max => Err(ConfigError::new(field, format!("must be at most {max}"))),
        Some(v) => Ok(Duration::from_millis(v)),
    }
}

impl RawRedis {
    /// Validates the block; `env` looks up `password_env`.
    pub(crate) fn validate(
        self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RedisConfig, ConfigError> {
        let text = self
            .url
            .ok_or_else(|| ConfigError::new("redis.url", "is required"))?;
        let url = url::Url::parse(&text)
            .map_err(|e| ConfigError::new("redis.url", format!("not a URL ({e})")))?;
        if !matches!(url.scheme(), "redis" | "rediss") {
            return Err(ConfigError::new(
                "redis.url",
                format!(
                    "scheme must be redis or rediss (TLS), got {:?}",
                    url.scheme()
                ),
            ));
        }
        if url.password().is_some() || !url.username().is_empty() {
            return Err(ConfigError::new(
                "redis.url",
                "must not contain credentials: use redis.username and redis.password_env",
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError::new("redis.url", "has no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::new(
                "redis.url",
                "must not have a query or fragment",
            ));
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u16>().is_err() {
            return Err(ConfigError::new(
                "redis.url",
                "the path must be a database number (/0) or empty",
            ));
        }
        let username = match self.username {
            Some(u) if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(ConfigError::new(
                    "redis.username",
                    "must be non-empty, without spaces",
                ));
            }
            u => u,
        };
        if self.password.is_some() && self.password_env.is_some() {
            return Err(ConfigError::new(
                "redis.password",
                "give either password or password_env, not both",
            ));
        }
        if self.password.as_ref().is_some_and(Secret::is_empty) {
            return Err(ConfigError::new("redis.password", "must not be empty"));
        }
        let password = match self.password_env {
            None => self.password,
            Some(name) if name.is_empty() => {
                return Err(ConfigError::new(
                    "redis.password_env",
                    "must name an environment variable",
                ));
            }
            Some(name) => match env(&name) {
                Some(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    return Err(ConfigError::new(
                        "redis.password_env",
                        format!("environment variable {name} is not set or empty"),
                    ));
                }
            },
        };
        let key_prefix = self.key_prefix.unwrap_or_else(|| "aoai-lb:".to_owned());
        if key_prefix.len() > 64
            || key_prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                "redis.key_prefix",
                "at most 64 characters, without braces, spaces or control characters",
            ));
        }
        let connect_timeout = ms(
            "redis.connect_timeout_ms",
            self.connect_timeout_ms,
            1_000,
            60_000,
        )?;
        let op_timeout = ms("redis.op_timeout_ms", self.op_timeout_ms, 250, 60_000)?;
        let lookup_timeout = ms("redis.lookup_timeout_ms", self.lookup_timeout_ms, 20, 5_000)?;
        let sync_interval = ms(
            "redis.sync_interval_ms",
            self.sync_interval_ms,
            1_000,
            60_000,
        )?;
        if sync_interval < Duration::from_millis(50) {
            return Err(ConfigError::new(
                "redis.sync_interval_ms",
                "must be at least 50",
            ));
        }
        if let Some(path) = &self.ca_file {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::new("redis.ca_file", "must name a file"));
            }
            if url.scheme() != "rediss" {
                return Err(ConfigError::new(
                    "redis.ca_file",
                    "only applies to a rediss:// url (TLS)",
                ));
            }
        }
        let cluster = match self.cluster {
            None => ClusterMode::Auto,
            Some(serde_json::Value::Bool(true)) => ClusterMode::On,
            Some(serde_json::Value::Bool(false)) => ClusterMode::Off,
            Some(serde_json::Value::String(s)) if s == "auto" => ClusterMode::Auto,
            Some(_) => {
                return Err(ConfigError::new(
                    "redis.cluster",
                    "must be true, false or \"auto\"",
                ));
            }
        };
        if cluster == ClusterMode::On && !matches!(db, "" | "0") {
            return Err(ConfigError::new(
                "redis.url",
                "a Redis Cluster has only database 0 (redis.cluster is true)",
            ));
        }
        Ok(RedisConfig {
            url,
            username,
            password,
            key_prefix,
            connect_timeout,
            op_timeout,
            lookup_timeout,
            sync_interval,
            pubsub: self.pubsub.unwrap_or(true),
            share_cooldowns: self.share.cooldowns.unwrap_or(true),
            share_affinity: self.share.affinity.unwrap_or(true),
            share_quotas: self.share.quotas.unwrap_or(true),
            quota_mode: self.quota_mode.unwrap_or_default(),
            ca_file: self.ca_file,
            cluster,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn doc(redis: &str) -> String {
        format!(
            r#"{{"instances":[{{"name":"a","url":"https://a.example.com","api_key":"k"}}],"redis":{redis}}}"#
        )
    }

    fn parse(redis: &str) -> Result<Config, String> {
        Config::from_json_env(&doc(redis), &|k| {
            (k == "REDIS_PW").then(|| "s3cret-pw".to_owned())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn without_the_block_there_is_no_redis() {
        let c = Config::from_json(
            r#"{"instances":[{"name":"a","url":"https://a.example.com","api_key":"k"}]}"#,
        )
        .unwrap();
        assert!(c.redis.is_none());
    }

    #[test]
    fn reads_every_field_with_defaults() {
        let c = parse(r#"{"url":"rediss://cache.example.com:6380/2"}"#).unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.url.as_str(), "rediss://cache.example.com:6380/2");
        assert_eq!(r.key_prefix, "aoai-lb:");
        assert_eq!(r.lookup_timeout.as_millis(), 20);
        assert_eq!(r.op_timeout.as_millis(), 250);
        assert_eq!(r.sync_interval.as_millis(), 1000);
        assert!(r.pubsub && r.share_cooldowns && r.share_affinity && r.share_quotas);
        assert_eq!(r.quota_mode, super::QuotaMode::Lease);
        assert!(r.password.is_none());
        assert_eq!(r.cluster, super::ClusterMode::Auto);

        let c = parse(
            r#"{"url":"redis://127.0.0.1:6379","username":"gw","password_env":"REDIS_PW",
                "key_prefix":"t1:","connect_timeout_ms":500,"op_timeout_ms":100,
                "lookup_timeout_ms":10,"sync_interval_ms":200,"pubsub":false,
                "share":{"cooldowns":true,"affinity":false,"quotas":false},"quota_mode":"strict"}"#,
        )
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.password.unwrap().expose(), "s3cret-pw");
        assert_eq!(r.username.as_deref(), Some("gw"));
        assert!(!r.pubsub && !r.share_affinity && !r.share_quotas);
        assert_eq!(r.quota_mode, super::QuotaMode::Strict);

        let c = parse(r#"{"url":"rediss://h:6380/0","password":"inline-pw"}"#).unwrap();
        assert_eq!(c.redis.unwrap().password.unwrap().expose(), "inline-pw");

        for (v, mode) in [
            ("true", super::ClusterMode::On),
            ("false", super::ClusterMode::Off),
            ("\"auto\"", super::ClusterMode::Auto),
        ] {
            let c = parse(&format!(r#"{{"url":"rediss://h:10000","cluster":{v}}}"#)).unwrap();
            assert_eq!(c.redis.unwrap().cluster, mode, "{v}");
        }
    }

    #[test]
    fn names_the_field_of_each_bad_value_on_one_line() {
        for (block, field) in [
            (r#"{}"#, "redis.url:"),
            (r#"{"url":"http://h:1"}"#, "redis.url:"),
            (r#"{"url":"redis://:pw@h:1"}"#, "redis.url:"),
            (r#"{"url":"redis://u:pw@h:1"}"#, "redis.url:"),
            (r#"{"url":"redis://h:1/x"}"#, "redis.url:"),
            (
                r#"{"url":"redis://h","password":"pw@","password_env":"REDIS_PW"}"#,
                "redis.password:",
            ),
            (r#"{"url":"redis://h","password":17}"#, "redis.password:"),
            (
                r#"{"url":"redis://h","password_env":"NOPE"}"#,
                "redis.password_env:",
            ),
            (
                r#"{"url":"redis://h","key_prefix":"a{b}"}"#,
                "redis.key_prefix:",
            ),
            (
                r#"{"url":"redis://h","op_timeout_ms":0}"#,
                "redis.op_timeout_ms:",
            ),
            (
                r#"{"url":"redis://h","lookup_timeout_ms":0}"#,
                "redis.lookup_timeout_ms:",
            ),
            (
                r#"{"url":"redis://h","sync_interval_ms":10}"#,
                "redis.sync_interval_ms:",
            ),
            (
                r#"{"url":"redis://h","quota_mode":"exact"}"#,
                "redis.quota_mode:",
            ),
            (r#"{"url":"redis://h","bogus":1}"#, "redis.bogus:"),
            (
                r#"{"url":"redis://h","share":{"x":true}}"#,
                "redis.share.x:",
            ),
            (
                r#"{"url":"redis://h","ca_file":"/etc/ca.pem"}"#,
                "redis.ca_file:",
            ),
            (r#"{"url":"rediss://h","ca_file":""}"#, "redis.ca_file:"),
            (r#"{"url":"redis://h","cluster":"yes"}"#, "redis.cluster:"),
            (r#"{"url":"redis://h","cluster":1}"#, "redis.cluster:"),
            (r#"{"url":"redis://h/2","cluster":true}"#, "redis.url:"),
        ] {
            let e = parse(block).unwrap_err();
            assert!(e.starts_with(field), "{block}: {e}");
            assert!(!e.contains('\n'), "{e}");
            assert!(!e.contains("pw@") && !e.contains("`17`"), "{e}");
        }
    }
}
