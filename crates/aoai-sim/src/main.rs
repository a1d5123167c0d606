//! The `aoai-sim` binary: serves N simulated Azure OpenAI resources on
//! consecutive ports, configured by flags and optionally a JSON file.
//!
//! Precedence, per instance: a field in the config file, else the flag, else the
//! library default. A bad config file ends the process with status 2 and one line
//! naming the offending field; a port that cannot be bound ends it with status 1.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use aoai_sim::{InstanceConfig, SimHandle};
use clap::Parser;
use serde_json::{Map, Value};

/// A fast Azure OpenAI simulator that behaves like Azure on the wire.
#[derive(Debug, Parser)]
#[command(name = "aoai-sim", version, about)]
struct Cli {
    /// Number of instances; with --config, defaults to the number of entries.
    #[arg(long)]
    instances: Option<usize>,
    /// Port of instance 0; instance i listens on base-port + i.
    #[arg(long, default_value_t = 18000)]
    base_port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Key every instance accepts (api-key or Authorization: Bearer).
    #[arg(long)]
    api_key: Option<String>,
    /// JSON file: a list of instance objects (see the README for the fields).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Enable the /_sim/ admin routes (journal and faults at run time).
    #[arg(long)]
    admin: bool,
    /// Time to first token, in milliseconds.
    #[arg(long)]
    ttft_ms: Option<u64>,
    /// Delay per generated token, in milliseconds.
    #[arg(long)]
    token_ms: Option<u64>,
    /// Length of generated replies, in tokens.
    #[arg(long)]
    reply_tokens: Option<u32>,
    /// Requests per minute per deployment (enforced per 10 s window).
    #[arg(long)]
    rpm: Option<u32>,
    /// Tokens per minute per deployment (rolling 60 s reservations of the
    /// prompt estimate plus max_tokens × n).
    #[arg(long)]
    tpm: Option<u32>,
    /// Also send x-ratelimit-limit-requests and x-ratelimit-limit-tokens.
    #[arg(long)]
    limit_headers: bool,
    /// Completion tokens reserved when a request sets no max_tokens
    /// (default: the reply the simulator will generate).
    #[arg(long)]
    default_max_tokens: Option<u32>,
    /// Model name reported in bodies; picks the tokenizer and reasoning
    /// (default: the deployment name).
    #[arg(long)]
    model: Option<String>,
    /// Hidden reasoning tokens per choice (default: 32 for reasoning models, else 0).
    #[arg(long)]
    reasoning_tokens: Option<u32>,
    /// Turn off prompt caching (cached_tokens stays 0).
    #[arg(long)]
    no_prompt_cache: bool,
    /// Region reported in x-ms-region.
    #[arg(long)]
    region: Option<String>,
    /// Comma-separated deployments to serve (default: any name).
    #[arg(long, value_delimiter = ',')]
    deployments: Option<Vec<String>>,
    /// Close keep-alive connections idle for this many milliseconds (default: never).
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Worker threads (default: the CPUs this process may use; 1 = single-threaded).
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse keys (403 AuthenticationTypeDisabled) and accept only Entra ID
    /// tokens, as a resource with disableLocalAuth.
    #[arg(long)]
    local_auth_disabled: bool,
    /// Also serve a simulated Entra ID / managed-identity host on this port
    /// (token, IMDS, JWKS and /_sim/mint routes; see the README).
    #[arg(long)]
    identity_port: Option<u16>,
    /// Lifetime of tokens the identity host issues, in seconds.
    #[arg(long, default_value_t = 3599)]
    token_lifetime_secs: u64,
    /// An app registration the identity host knows, as CLIENT_ID:SECRET (repeatable).
    #[arg(long)]
    client_secret: Vec<String>,
}

/// An instance to start and where.
struct Planned {
    cfg: InstanceConfig,
    addr: SocketAddr,
}

/// The flags as a JSON object of instance fields, so file entries can override
/// them key by key and share one deserialiser (and its error paths).
fn flag_defaults(cli: &Cli) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(k) = &cli.api_key {
        m.insert("api_key".into(), Value::from(k.as_str()));
    }
    if cli.admin {
        m.insert("admin".into(), Value::from(true));
    }
    if cli.ttft_ms.is_some() || cli.token_ms.is_some() {
        m.insert(
            "latency".into(),
            serde_json::json!({
                "ttft_ms": cli.ttft_ms.unwrap_or(0),
                "per_token_ms": cli.token_ms.unwrap_or(0),
            }),
        );
    }
    if let Some(n) = cli.reply_tokens {
        m.insert("reply_tokens".into(), Value::from(n));
    }
    if cli.rpm.is_some()
        || cli.tpm.is_some()
        || cli.limit_headers
        || cli.default_max_tokens.is_some()
    {
        m.insert(
            "rate_limit".into(),
            serde_json::json!({
                "rpm": cli.rpm.unwrap_or(0),
                "tpm": cli.tpm.unwrap_or(0),
                "limit_headers": cli.limit_headers,
                "default_max_tokens": cli.default_max_tokens,
            }),
        );
    }
    if let Some(model) = &cli.model {
        m.insert("model".into(), Value::from(model.as_str()));
    }
    if let Some(n) = cli.reasoning_tokens {
        m.insert("reasoning_tokens".into(), Value::from(n));
    }
    if cli.no_prompt_cache {
        m.insert("prompt_cache".into(), Value::from(false));
    }
    if let Some(r) = &cli.region {
        m.insert("region".into(), Value::from(r.as_str()));
    }
    if let Some(d) = &cli.deployments {
        m.insert("deployments".into(), Value::from(d.clone()));
    }
    if let Some(ms) = cli.idle_timeout_ms {
        m.insert("idle_timeout_ms".into(), Value::from(ms));
    }
    if cli.local_auth_disabled {
        m.insert("local_auth_disabled".into(), Value::from(true));
    }
    m
}

/// The identity host the flags ask for, started before the instances.
async fn start_identity(cli: &Cli) -> Result<Option<aoai_sim::IdentityHandle>, String> {
    let Some(port) = cli.identity_port else {
        return Ok(None);
    };
    let mut secrets = Vec::with_capacity(cli.client_secret.len());
    for pair in &cli.client_secret {
        let Some((id, secret)) = pair.split_once(':') else {
            return Err("--client-secret: expected CLIENT_ID:SECRET".to_owned());
        };
        secrets.push((id.to_owned(), secret.to_owned()));
    }
    let cfg = aoai_sim::IdentityConfig {
        token_lifetime_secs: cli.token_lifetime_secs,
        ..aoai_sim::IdentityConfig::default()
    };
    let h = aoai_sim::start_identity_on(SocketAddr::new(cli.host, port), cfg)
        .await
        .map_err(|e| format!("identity host: {e}"))?;
    for (id, secret) in secrets {
        h.add_client_secret(id, secret);
    }
    eprintln!(
        "aoai-sim identity host (tenant {}) listening on {}",
        h.tenant_id(),
        h.url()
    );
    Ok(Some(h))
}

fn plan(cli: &Cli) -> Result<Vec<Planned>, String> {
    let entries: Vec<Value> = match &cli.config {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            let de = &mut serde_json::Deserializer::from_str(&text);
            let v: Vec<Value> = serde_path_to_error::deserialize(de).map_err(|e| {
                format!(
                    "config file {}: {}: {}",
                    path.display(),
                    e.path(),
                    e.inner()
                )
            })?;
            v
        }
    };
    let n = match (cli.instances, cli.config.is_some()) {
        (Some(n), true) if n != entries.len() => {
            return Err(format!(
                "--instances {n} does not match the {} entries of the config file",
                entries.len()
            ));
        }
        (Some(n), _) => n,
        (None, true) => entries.len(),
        (None, false) => 1,
    };
    if n == 0 {
        return Err("nothing to serve: --instances must be at least 1".to_owned());
    }
    let src = cli.config.as_ref().map_or_else(
        || "flags".to_owned(),
        |p| format!("config file {}", p.display()),
    );
    let base = flag_defaults(cli);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut obj = base.clone();
        obj.insert("name".into(), Value::from(format!("sim-{i}")));
        let mut port = u16::try_from(usize::from(cli.base_port) + i)
            .map_err(|_| format!("port of instance {i} is above 65535"))?;
        match entries.get(i) {
            None => {}
            Some(Value::Object(entry)) => {
                for (k, v) in entry {
                    if k == "port" {
                        port = v
                            .as_u64()
                            .and_then(|p| u16::try_from(p).ok())
                            .ok_or_else(|| {
                                format!("{src}: [{i}].port: expected a port number, got {v}")
                            })?;
                    } else {
                        obj.insert(k.clone(), v.clone());
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "{src}: [{i}]: expected an instance object, got {other}"
                ));
            }
        }
        let cfg: InstanceConfig = serde_path_to_error::deserialize(Value::Object(obj))
            .map_err(|e| format!("{src}: [{i}].{}: {}", e.path(), e.inner()))?;
        out.push(Planned {
            cfg,
            addr: SocketAddr::new(cli.host, port),
        });
    }
    Ok(out)
}

async fn run(cli: &Cli, planned: Vec<Planned>) -> ExitCode {
    let identity = match start_identity(cli).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("aoai-sim: {e}");
            return ExitCode::from(1);
        }
    };
    let mut handles: Vec<SimHandle> = Vec::with_capacity(planned.len());
    for p in planned {
        let name = p.cfg.name.clone();
        match aoai_sim::start_on(p.addr, p.cfg).await {
            Ok(h) => {
                eprintln!("aoai-sim instance {name} listening on {}", h.url());
                handles.push(h);
            }
            Err(e) => {
                eprintln!("aoai-sim: instance {name}: {e}");
                for h in &handles {
                    h.stop();
                }
                return ExitCode::from(1);
            }
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    for h in &handles {
        h.stop();
    }
    if let Some(h) = identity {
        h.stop();
    }
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let planned = match plan(&cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("aoai-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let threads = cli.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match rt {
        Ok(rt) => rt.block_on(run(&cli, planned)),
        Err(e) => {
            eprintln!("aoai-sim: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}
