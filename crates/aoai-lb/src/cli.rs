//! Command line and environment: what the operator asked for.
//!
//! The variable names are the seed app's contract and must not change:
//! `OPENAI_INSTANCES` (the JSON document), `API_KEY` (the client key),
//! `PORT`, plus `OPENAI_CONFIG_PATH`, `HOST`, `ADMIN_PORT`, `ADMIN_HOST`,
//! `ALLOW_UNAUTHENTICATED`, `LOG_FORMAT`, `LOG_LEVEL` and `RUST_LOG`.
//! A flag always overrides the matching variable. Secrets are read from the
//! environment only, never from flags, so they do not show up in `ps`.
//!
//! Resolution is a pure function of the parsed flags and an environment
//! lookup, so it is tested without touching the process environment.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Config, ConfigError};
use crate::logging::LogFormat;
use crate::secret::Secret;

/// The most worker threads `--workers` / `AOAI_LB_WORKERS` accepts.
pub const MAX_WORKERS: usize = 1024;

/// The client key the demo uses when `API_KEY` is not set.
pub const DEMO_CLIENT_KEY: &str = "demo-key";

const ENV_HELP: &str = "\
Environment (flags override):
  OPENAI_INSTANCES       the configuration document as a JSON string
  OPENAI_CONFIG_PATH     the configuration document as a file (same as --config); reloaded on
                         SIGHUP and when its content changes
  CONFIG_POLL_MS         how often that file is read for changes (default 2000; 0 = only on SIGHUP)
  API_KEY                key clients must send (Authorization: Bearer <key> or api-key: <key>)
  ALLOW_UNAUTHENTICATED  true to run without API_KEY (an open proxy; logs a warning)
  HOST, PORT             public listener (default 0.0.0.0:8000)
  ADMIN_HOST, ADMIN_PORT admin listener: status page at /, /metrics, /admin/* (default HOST:8001)
  LOG_FORMAT             json (default) or text
  AOAI_LB_WORKERS        threads serving the public port (default: one per usable CPU, cgroup quota
                         included)
  AOAI_LB_HTTP1          the HTTP/1 server for clients: relay or hyper (default: the configuration's
                         server.http1, relay)
  RUST_LOG, LOG_LEVEL    log filter (RUST_LOG wins; default info)";

/// A load-balancing gateway for Azure OpenAI.
#[derive(Debug, Parser)]
#[command(name = "aoai-lb", version, about, after_help = ENV_HELP)]
pub struct Cli {
    /// Read the configuration document from FILE [env: OPENAI_CONFIG_PATH].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public listener port [env: PORT] [default: 8000].
    #[arg(long)]
    pub port: Option<u16>,
    /// Public listener address [env: HOST] [default: 0.0.0.0; 127.0.0.1 with --demo].
    #[arg(long)]
    pub host: Option<String>,
    /// Admin listener port (/metrics, /admin/backends) [env: ADMIN_PORT] [default: 8001].
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// Admin listener address [env: ADMIN_HOST] [default: the public address].
    #[arg(long)]
    pub admin_host: Option<String>,
    /// Run without a client key: anyone who reaches the port can use the
    /// backends [env: ALLOW_UNAUTHENTICATED=true].
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// Log format: json or text [env: LOG_FORMAT] [default: json; text with --demo].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Run in front of two in-process simulated instances, no Azure needed.
    #[arg(long)]
    pub demo: bool,
    /// How often the configuration file is read for changes, in ms; 0 reads
    /// it only on SIGHUP [env: CONFIG_POLL_MS] [default: 2000].
    #[arg(long, value_name = "MS")]
    pub config_poll_ms: Option<u64>,
    /// Threads serving the public port, each with its own listener on it
    /// [env: AOAI_LB_WORKERS] [default: one per CPU the process may use,
    /// the cgroup CPU quota included].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// The HTTP/1 server for clients: relay (the gateway's own) or hyper;
    /// overrides the configuration's `server.http1` [env: AOAI_LB_HTTP1]
    /// [default: relay].
    #[arg(long, value_name = "SERVER")]
    pub http1: Option<String>,
}

/// Where the configuration document comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `OPENAI_INSTANCES`.
    Env(String),
    /// `--config` or `OPENAI_CONFIG_PATH`.
    File(PathBuf),
    /// `--demo`: built from the simulated instances at start-up.
    Demo,
}

/// Everything the binary needs to start, resolved from flags and env.
#[derive(Debug)]
pub struct Settings {
    pub source: ConfigSource,
    pub host: String,
    pub port: u16,
    pub admin_host: Option<String>,
    pub admin_port: u16,
    /// `None` only with `allow_unauthenticated` (checked by the server).
    pub client_key: Option<Secret>,
    pub allow_unauthenticated: bool,
    pub log_format: LogFormat,
    pub rust_log: Option<String>,
    pub log_level: Option<String>,
    pub demo: bool,
    /// `OPENAI_INSTANCES` was set but a file was chosen over it (worth a
    /// notice: the operator may expect the variable to apply).
    pub ignored_env_document: bool,
    /// How often a configuration file is read for changes; `None` only on
    /// SIGHUP. Default 2 s.
    pub config_poll: Option<std::time::Duration>,
    /// Threads serving the public port (`--workers`, `AOAI_LB_WORKERS`);
    /// `None`: one per usable CPU ([`crate::cpus::usable`]).
    pub workers: Option<usize>,
    /// The HTTP/1 server (`--http1`, `AOAI_LB_HTTP1`), overriding the
    /// configuration's `server.http1`; `None`: the configuration decides.
    pub http1: Option<crate::relay::Http1Server>,
}

/// A start-up problem, on one line, never containing a secret.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No configuration source at all.
    #[error(
        "no configuration: set OPENAI_INSTANCES to the JSON document, or OPENAI_CONFIG_PATH / --config to a file containing it (or try --demo)"
    )]
    NoConfig,
    /// An environment variable has an unusable value.
    #[error("{var}: {reason}")]
    Env { var: &'static str, reason: String },
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}: {reason}")]
    ReadFile { path: String, reason: String },
    /// The document is invalid.
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    /// The document is not JSON at all; `origin` is `OPENAI_INSTANCES` or
    /// `configuration file <path>`, `reason` ends with the line and column.
    #[error("{origin} is not valid JSON: {reason}")]
    NotJson { origin: String, reason: String },
}

impl CliError {
    fn from_document(origin: impl FnOnce() -> String, e: ConfigError) -> Self {
        if e.not_json {
            Self::NotJson {
                origin: origin(),
                reason: e.reason,
            }
        } else {
            Self::Config(e)
        }
    }
}

// By hand rather than `#[from]`: the message already contains the cause,
// and a `source` would make error reporters print it twice.
impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn env_port(var: &'static str, v: Option<String>) -> Result<Option<u16>, CliError> {
    match non_empty(v) {
        None => Ok(None),
        Some(s) => s.trim().parse().map(Some).map_err(|_| CliError::Env {
            var,
            reason: format!("must be a port number (0-65535), got {s:?}"),
        }),
    }
}

fn env_bool(var: &'static str, v: Option<String>) -> Result<bool, CliError> {
    match non_empty(v).map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(s) => match s.as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(CliError::Env {
                var,
                reason: format!("must be true or false, got {s:?}"),
            }),
        },
    }
}

impl Settings {
    /// Combines flags with the environment (`env` looks a variable up).
    ///
    /// # Errors
    /// [`CliError`] for a missing or ambiguous configuration source or an
    /// unusable variable. The client key is not checked here: the server
    /// refuses to start without one unless unauthenticated mode is chosen.
    pub fn resolve(cli: Cli, env: impl Fn(&str) -> Option<String>) -> Result<Settings, CliError> {
        let env_document = non_empty(env("OPENAI_INSTANCES")).is_some();
        let source = if cli.demo {
            ConfigSource::Demo
        } else if let Some(path) = cli.config {
            ConfigSource::File(path)
        } else {
            match (
                non_empty(env("OPENAI_INSTANCES")),
                non_empty(env("OPENAI_CONFIG_PATH")),
            ) {
                (Some(doc), None) => ConfigSource::Env(doc),
                (_, Some(path)) => ConfigSource::File(PathBuf::from(path)),
                (None, None) => return Err(CliError::NoConfig),
            }
        };
        let log_format = match cli.log_format.or_else(|| non_empty(env("LOG_FORMAT"))) {
            Some(s) => s.parse().map_err(|reason| CliError::Env {
                var: "LOG_FORMAT",
                reason,
            })?,
            None if cli.demo => LogFormat::Text,
            None => LogFormat::Json,
        };
        let port = match cli.port {
            Some(p) => p,
            None => env_port("PORT", env("PORT"))?.unwrap_or(8000),
        };
        let admin_port = match cli.admin_port {
            Some(p) => p,
            None => env_port("ADMIN_PORT", env("ADMIN_PORT"))?.unwrap_or(8001),
        };
        let host = cli
            .host
            .or_else(|| non_empty(env("HOST")))
            .map(|h| h.trim().to_owned())
            // The demo key is printed for anyone to paste: keep the demo on
            // this machine unless a host is asked for explicitly.
            .unwrap_or_else(|| if cli.demo { "127.0.0.1" } else { "0.0.0.0" }.to_owned());
        let admin_host = cli
            .admin_host
            .or_else(|| non_empty(env("ADMIN_HOST")))
            .map(|h| h.trim().to_owned());
        let allow_unauthenticated = cli.allow_unauthenticated
            || env_bool("ALLOW_UNAUTHENTICATED", env("ALLOW_UNAUTHENTICATED"))?;
        let client_key = match non_empty(env("API_KEY")) {
            Some(k) => Some(Secret::new(k.trim())),
            None if cli.demo && !allow_unauthenticated => Some(Secret::new(DEMO_CLIENT_KEY)),
            None => None,
        };
        let ignored_env_document = env_document && matches!(source, ConfigSource::File(_));
        let poll_ms = match cli.config_poll_ms {
            Some(ms) => ms,
            None => match non_empty(env("CONFIG_POLL_MS")) {
                None => 2_000,
                Some(v) => v.trim().parse().map_err(|_| CliError::Env {
                    var: "CONFIG_POLL_MS",
                    reason: format!("must be a number of milliseconds, got {v:?}"),
                })?,
            },
        };
        let config_poll = (poll_ms > 0).then(|| std::time::Duration::from_millis(poll_ms));
        let workers = match cli.workers {
            Some(n) => Some(n),
            None => match non_empty(env("AOAI_LB_WORKERS")) {
                None => None,
                Some(v) => Some(v.trim().parse().map_err(|_| CliError::Env {
                    var: "AOAI_LB_WORKERS",
                    reason: format!("must be a number of threads (1-{MAX_WORKERS}), got {v:?}"),
                })?),
            },
        };
        if let Some(n) = workers
            && !(1..=MAX_WORKERS).contains(&n)
        {
            return Err(CliError::Env {
                var: if cli.workers.is_some() {
                    "--workers"
                } else {
                    "AOAI_LB_WORKERS"
                },
                reason: format!("must be a number of threads (1-{MAX_WORKERS}), got {n}"),
            });
        }
        let http1 = match cli.http1 {
            Some(v) => Some(("--http1", v)),
            None => non_empty(env("AOAI_LB_HTTP1")).map(|v| ("AOAI_LB_HTTP1", v)),
        };
        let http1 = match http1 {
            None => None,
            Some((var, v)) => Some(crate::relay::Http1Server::parse(v.trim()).ok_or_else(
                || CliError::Env {
                    var,
                    reason: format!("must be relay or hyper, got {v:?}"),
                },
            )?),
        };
        Ok(Settings {
            source,
            host,
            port,
            admin_host,
            admin_port,
            client_key,
            allow_unauthenticated,
            log_format,
            rust_log: non_empty(env("RUST_LOG")),
            log_level: non_empty(env("LOG_LEVEL")),
            demo: cli.demo,
            ignored_env_document,
            config_poll,
            workers,
            http1,
        })
    }

    /// Reads and validates the configuration document (not for
    /// [`ConfigSource::Demo`], whose document is built at start-up).
    ///
    /// # Errors
    /// [`CliError::ReadFile`], [`CliError::NotJson`] or [`CliError::Config`].
    pub fn load_config(&self) -> Result<Config, CliError> {
        match &self.source {
            ConfigSource::Env(doc) => Config::from_json(doc)
                .map_err(|e| CliError::from_document(|| "OPENAI_INSTANCES".to_owned(), e)),
            ConfigSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| CliError::ReadFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Config::from_json(&text).map_err(|e| {
                    CliError::from_document(|| format!("configuration file {}", path.display()), e)
                })
            }
            ConfigSource::Demo => Err(CliError::NoConfig),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, CliError> {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut argv = vec!["aoai-lb"];
        argv.extend_from_slice(args);
        Settings::resolve(Cli::try_parse_from(argv).unwrap(), |k| map.get(k).cloned())
    }

    const DOC: &str = r#"{"instances":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k"}]}"#;

    #[test]
    fn http1_server_comes_from_the_flag_or_the_environment() {
        use crate::relay::Http1Server;
        let s = resolve(&[], &[("OPENAI_INSTANCES", DOC)]).unwrap();
        assert_eq!(s.http1, None);
        let s = resolve(
            &[],
            &[("OPENAI_INSTANCES", DOC), ("AOAI_LB_HTTP1", "hyper")],
        )
        .unwrap();
        assert_eq!(s.http1, Some(Http1Server::Hyper));
        let s = resolve(
            &["--http1", "relay"],
            &[("OPENAI_INSTANCES", DOC), ("AOAI_LB_HTTP1", "hyper")],
        )
        .unwrap();
        assert_eq!(s.http1, Some(Http1Server::Relay));
        let e = resolve(
            &[],
            &[("OPENAI_INSTANCES", DOC), ("AOAI_LB_HTTP1", "nginx")],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.starts_with("AOAI_LB_HTTP1: "), "{e}");
        let e = resolve(&["--http1", "h2"], &[("OPENAI_INSTANCES", DOC)])
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("--http1: "), "{e}");
    }

    #[test]
    fn uses_the_seed_defaults() {
        let s = resolve(&[], &[("OPENAI_INSTANCES", DOC), ("API_KEY", "ck")]).unwrap();
        assert_eq!(s.host, "0.0.0.0");
        assert_eq!(s.port, 8000);
        assert_eq!(s.admin_port, 8001);
        assert_eq!(s.log_format, LogFormat::Json);
        assert!(s.client_key.unwrap().matches(b"ck"));
        assert!(!s.allow_unauthenticated);
        assert_eq!(s.source, ConfigSource::Env(DOC.to_owned()));
    }

    #[test]
    fn flags_override_the_environment() {
        let s = resolve(
            &[
                "--port",
                "9000",
                "--host",
                "127.0.0.1",
                "--admin-port",
                "9001",
                "--config",
                "/x.json",
                "--log-format",
                "text",
            ],
            &[
                ("OPENAI_INSTANCES", DOC),
                ("PORT", "7000"),
                ("HOST", "10.0.0.1"),
                ("ADMIN_PORT", "7001"),
                ("LOG_FORMAT", "json"),
            ],
        )
        .unwrap();
        assert_eq!(s.port, 9000);
        assert_eq!(s.host, "127.0.0.1");
        assert_eq!(s.admin_port, 9001);
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.source, ConfigSource::File("/x.json".into()));
    }

    #[test]
    fn reads_ports_and_hosts_from_the_environment() {
        let s = resolve(
            &[],
            &[
                ("OPENAI_CONFIG_PATH", "/c.json"),
                ("PORT", "7000"),
                ("HOST", "127.0.0.1"),
                ("ADMIN_PORT", "7001"),
            ],
        )
        .unwrap();
        assert_eq!((s.port, s.admin_port), (7000, 7001));
        assert_eq!(s.host, "127.0.0.1");
        assert_eq!(s.source, ConfigSource::File("/c.json".into()));
    }

    #[test]
    fn refuses_missing_configuration_and_prefers_a_file() {
        assert!(matches!(resolve(&[], &[]), Err(CliError::NoConfig)));
        let s = resolve(
            &[],
            &[("OPENAI_INSTANCES", DOC), ("OPENAI_CONFIG_PATH", "/c")],
        )
        .unwrap();
        assert_eq!(s.source, ConfigSource::File("/c".into()));
        assert!(s.ignored_env_document);
        let s = resolve(&["--config", "/f"], &[("OPENAI_INSTANCES", DOC)]).unwrap();
        assert_eq!(s.source, ConfigSource::File("/f".into()));
        assert!(s.ignored_env_document);
        assert!(
            !resolve(&[], &[("OPENAI_INSTANCES", DOC)])
                .unwrap()
                .ignored_env_document
        );
        assert!(matches!(
            resolve(&[], &[("OPENAI_INSTANCES", "  ")]),
            Err(CliError::NoConfig)
        ));
    }

    #[test]
    fn names_the_variable_with_a_bad_value() {
        let e = resolve(&[], &[("OPENAI_INSTANCES", DOC), ("PORT", "http")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("PORT: "), "{e}");
        let e = resolve(
            &[],
            &[
                ("OPENAI_INSTANCES", DOC),
                ("ALLOW_UNAUTHENTICATED", "maybe"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("ALLOW_UNAUTHENTICATED: "), "{e}");
    }

    #[test]
    fn reads_the_worker_count_from_the_flag_or_the_environment() {
        let s = resolve(&[], &[("OPENAI_INSTANCES", DOC)]).unwrap();
        assert_eq!(s.workers, None, "automatic by default");
        let s = resolve(
            &[],
            &[("OPENAI_INSTANCES", DOC), ("AOAI_LB_WORKERS", " 3 ")],
        )
        .unwrap();
        assert_eq!(s.workers, Some(3));
        let s = resolve(
            &["--workers", "2"],
            &[("OPENAI_INSTANCES", DOC), ("AOAI_LB_WORKERS", "3")],
        )
        .unwrap();
        assert_eq!(s.workers, Some(2), "the flag wins");
        for bad in ["0", "many", "-1", "100000"] {
            let e = resolve(&[], &[("OPENAI_INSTANCES", DOC), ("AOAI_LB_WORKERS", bad)])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("AOAI_LB_WORKERS: "), "{e}");
        }
        let e = resolve(&["--workers", "0"], &[("OPENAI_INSTANCES", DOC)])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--workers: "), "{e}");
    }

    #[test]
    fn reads_the_config_poll_interval_with_zero_meaning_only_on_sighup() {
        let s = resolve(&[], &[("OPENAI_CONFIG_PATH", "/c")]).unwrap();
        assert_eq!(s.config_poll, Some(std::time::Duration::from_secs(2)));
        let s = resolve(
            &[],
            &[("OPENAI_CONFIG_PATH", "/c"), ("CONFIG_POLL_MS", "250")],
        )
        .unwrap();
        assert_eq!(s.config_poll, Some(std::time::Duration::from_millis(250)));
        let s = resolve(
            &["--config-poll-ms", "0"],
            &[("OPENAI_CONFIG_PATH", "/c"), ("CONFIG_POLL_MS", "250")],
        )
        .unwrap();
        assert_eq!(s.config_poll, None);
        let e = resolve(
            &[],
            &[("OPENAI_CONFIG_PATH", "/c"), ("CONFIG_POLL_MS", "2s")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("CONFIG_POLL_MS: "), "{e}");
    }

    #[test]
    fn treats_an_empty_api_key_as_unset() {
        let s = resolve(&[], &[("OPENAI_INSTANCES", DOC), ("API_KEY", " ")]).unwrap();
        assert!(s.client_key.is_none());
        let s = resolve(
            &[],
            &[("OPENAI_INSTANCES", DOC), ("ALLOW_UNAUTHENTICATED", "TRUE")],
        )
        .unwrap();
        assert!(s.allow_unauthenticated);
    }

    #[test]
    fn demo_defaults_to_a_printed_key_and_text_logs() {
        let s = resolve(&["--demo"], &[]).unwrap();
        assert_eq!(s.source, ConfigSource::Demo);
        assert!(s.client_key.unwrap().matches(DEMO_CLIENT_KEY.as_bytes()));
        assert_eq!(s.log_format, LogFormat::Text);
        assert_eq!(s.host, "127.0.0.1");
        let s = resolve(&["--demo"], &[("API_KEY", "mine"), ("HOST", "0.0.0.0")]).unwrap();
        assert_eq!(s.host, "0.0.0.0");
        assert!(s.client_key.unwrap().matches(b"mine"));
    }

    #[test]
    fn says_which_source_is_not_valid_json_and_where() {
        // The seed's message was only "instances: EOF while parsing a value
        // at line 1 column 119".
        let truncated = &DOC[..DOC.len() - 3];
        let s = resolve(&[], &[("OPENAI_INSTANCES", truncated)]).unwrap();
        let e = s.load_config().unwrap_err().to_string();
        assert!(
            e.starts_with("OPENAI_INSTANCES is not valid JSON: EOF while parsing"),
            "{e}"
        );
        assert!(e.contains(" at line 1 column "), "{e}");
        assert!(!e.contains('\n'), "{e}");

        let dir = std::env::temp_dir().join(format!("aoai-lb-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("instances.json");
        std::fs::write(
            &path,
            "{\n  \"instances\": [\n    {\"name\": \"a\",}\n  ]\n}\n",
        )
        .unwrap();
        let s = resolve(&["--config", path.to_str().unwrap()], &[]).unwrap();
        let e = s.load_config().unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.starts_with(&format!(
                "configuration file {} is not valid JSON: ",
                path.display()
            )),
            "{e}"
        );
        assert!(
            e.ends_with("trailing comma at line 3 column 18 (while reading instances[0])"),
            "{e}"
        );
    }

    #[test]
    fn reports_config_errors_with_the_field() {
        let s = resolve(
            &[],
            &[(
                "OPENAI_INSTANCES",
                r#"{"instances":[{"name":"a","url":"nope","api_key":"k"}]}"#,
            )],
        )
        .unwrap();
        let e = s.load_config().unwrap_err().to_string();
        assert!(
            e.starts_with("invalid configuration: instances[0].url: "),
            "{e}"
        );
    }
}
