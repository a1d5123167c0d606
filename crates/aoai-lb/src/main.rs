//! The `aoai-lb` binary: read flags and environment, set up logging and
//! metrics, validate the configuration, serve, and shut down gracefully on
//! SIGTERM or SIGINT.
//!
//! Every start-up problem ends the process before it listens, with one log
//! line saying what is wrong and how to fix it, and a non-zero exit code.
//! A second signal during the drain ends the grace period early.

use std::process::ExitCode;
use std::sync::Arc;

use aoai_lb::cli::{Cli, ConfigSource, Settings};
use aoai_lb::logging::{self, LogFormat};
use aoai_lb::server::{ServeError, ServeOptions, spawn};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

// jemalloc: fast for the many small, short-lived allocations of each proxied
// request (header maps, records, body frames), and it gives memory back to
// the OS after a burst of streams on its own background thread, while the
// worker threads sit idle (mimalloc and glibc only purge on later allocator
// calls, so an idle gateway kept its peak RSS). The decay times are baked in
// at build time (`.cargo/config.toml`).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    install_panic_hook();
    let cli = Cli::parse();
    let early_format = cli
        .log_format
        .clone()
        .or_else(|| std::env::var("LOG_FORMAT").ok())
        .and_then(|f| f.parse::<LogFormat>().ok())
        .unwrap_or(if cli.demo {
            LogFormat::Text
        } else {
            LogFormat::Json
        });
    let resolved = Settings::resolve(cli, |k| std::env::var(k).ok());
    let (format, rust_log, log_level) = match &resolved {
        Ok(s) => (s.log_format, s.rust_log.clone(), s.log_level.clone()),
        Err(_) => (early_format, None, None),
    };
    let filter = match logging::filter(rust_log.as_deref(), log_level.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            // Logging is not up yet; this is the one line we can give.
            eprintln!("aoai-lb: {e}");
            return ExitCode::from(2);
        }
    };
    let guard = match logging::init(format, filter) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("aoai-lb: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match resolved {
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
        Ok(settings) => match run(settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(1)
            }
        },
    };
    // Drains every pending log line before the process exits.
    guard.finish();
    code
}

fn run(settings: Settings) -> anyhow::Result<()> {
    // One single-threaded runtime per CPU the process may use (this one,
    // plus one per extra worker thread the server starts): a connection
    // stays on the thread that accepted it, with no work stealing or
    // cross-thread wake-ups. See `aoai_lb::server` and `aoai_lb::cpus`.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    // Kept alive until the gateway has stopped.
    let mut demo = None;
    let mut config = match settings.source {
        ConfigSource::Demo => {
            let d = aoai_lb::demo::start().await?;
            let config = d.config.clone();
            demo = Some(d);
            config
        }
        _ => settings.load_config()?,
    };
    let no_keys = settings.client_key.is_none() && config.clients.is_empty();
    if no_keys && !settings.allow_unauthenticated {
        return Err(ServeError::MissingClientKey.into());
    }
    if let Some(http1) = settings.http1 {
        config.server.http1 = http1;
    }
    let config = Arc::new(config);
    for inst in &config.instances {
        tracing::info!(
            instance = %inst.name,
            host = inst.url.host_str().unwrap_or(""),
            priority = inst.priority,
            weight = inst.weight,
            deployments = inst
                .deployments
                .as_ref()
                .map(|d| d.0.keys().cloned().collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "*".to_owned()),
            "backend configured"
        );
    }
    if settings.ignored_env_document {
        tracing::info!(
            "OPENAI_INSTANCES is ignored: the configuration file given by --config or OPENAI_CONFIG_PATH takes precedence"
        );
    }
    if !no_keys && settings.allow_unauthenticated && !settings.demo {
        tracing::info!(
            "client keys are configured (API_KEY or clients), so clients must send one; --allow-unauthenticated has no effect"
        );
    }
    for c in &config.clients {
        tracing::info!(
            client = %c.name,
            keys = c.key_hashes.len(),
            entra_principals = c.entra_app_ids.len() + c.entra_object_ids.len(),
            deployments = c
                .deployments
                .as_ref()
                .map(|d| d.iter().cloned().collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "*".to_owned()),
            rpm = c.rpm,
            tpm = c.tpm,
            "client configured"
        );
    }
    if no_keys && settings.allow_unauthenticated {
        tracing::warn!(
            "client authentication is OFF (--allow-unauthenticated): anyone who can reach this port can use the configured backends; set API_KEY to require a key"
        );
    }

    let tracing_settings = aoai_lb::otel::Settings::from_env(|k| std::env::var(k).ok())?;
    let otel = match &tracing_settings {
        Some(s) => {
            let t = aoai_lb::otel::Tracing::start(s)?;
            tracing::info!(
                protocol = match s.protocol {
                    aoai_lb::otel::Protocol::Grpc => "grpc",
                    aoai_lb::otel::Protocol::HttpProtobuf => "http/protobuf",
                },
                service_name = %s.service_name,
                "OpenTelemetry tracing on: one span per request and per upstream attempt"
            );
            Some(t)
        }
        None => None,
    };
    let opts = ServeOptions {
        host: settings.host.clone(),
        port: settings.port,
        admin_host: settings.admin_host.clone(),
        admin_port: settings.admin_port,
        client_key: settings.client_key.clone(),
        allow_unauthenticated: settings.allow_unauthenticated,
        config_source: match &settings.source {
            ConfigSource::Env(_) => "OPENAI_INSTANCES".to_owned(),
            ConfigSource::File(path) => format!("file {}", path.display()),
            ConfigSource::Demo => "demo".to_owned(),
        },
        tracing: otel.clone(),
        clock: aoai_lb::backend::Clock::new(),
        azure_env: aoai_lb::credential::AzureEnv::from_process(),
        config_file: match &settings.source {
            ConfigSource::File(path) => Some(path.clone()),
            _ => None,
        },
        config_poll: settings.config_poll,
        workers: settings.workers.unwrap_or_else(aoai_lb::cpus::usable),
    };
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("cannot watch SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| anyhow::anyhow!("cannot watch SIGINT: {e}"))?;
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("cannot watch SIGHUP: {e}"))?;
    let handle = spawn(config.clone(), opts).await?;

    if let Some(d) = &demo {
        let host = match settings.host.as_str() {
            "0.0.0.0" | "::" | "[::]" => "127.0.0.1".to_owned(),
            h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
            h => h.to_owned(),
        };
        let base = format!("http://{host}:{}", handle.local_addr().port());
        let key = settings.client_key.as_ref().map_or("<any>", |k| k.expose());
        let names: Vec<&str> = d.sims.iter().map(|s| s.name()).collect();
        tracing::info!(
            backends = names.join(","),
            url = %base,
            "demo ready: two simulated instances behind the gateway"
        );
        // Plain text on stderr, so it can be copied as is whatever the
        // log format.
        eprintln!(
            "\nTry it:\n\n{}\n\nStreaming:\n\n{}\n",
            aoai_lb::demo::curl(&base, key, false),
            aoai_lb::demo::curl(&base, key, true)
        );
        let clients: Vec<String> = aoai_lb::demo::CLIENTS
            .iter()
            .map(|(name, key, what)| format!("  {name}: key {key} ({what})"))
            .collect();
        eprintln!(
            "Named clients (use their key instead of {key}; limits at http://{host}:{}/admin/clients):\n\n{}\n",
            handle.admin_addr().port(),
            clients.join("\n")
        );
    }

    let control = handle.control();
    let signal_name = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                if !control.reload() {
                    tracing::warn!(
                        "SIGHUP: nothing to reload: the configuration comes from {}, which cannot change while the process runs (use --config / OPENAI_CONFIG_PATH for a file that can)",
                        if settings.demo { "--demo" } else { "OPENAI_INSTANCES" }
                    );
                }
            }
        }
    };
    tracing::info!(
        signal = signal_name,
        drain_delay_ms = u64::try_from(config.server.drain_delay.as_millis()).unwrap_or(u64::MAX),
        grace_ms = u64::try_from(config.server.shutdown_grace.as_millis()).unwrap_or(u64::MAX),
        "shutting down: /readyz is 503 now, the listener closes after the drain delay, then in-flight requests get the grace period"
    );
    control.shutdown();
    // SIGHUP during the drain is ignored rather than ending the process.
    tokio::spawn(async move { while hup.recv().await.is_some() {} });
    let mut wait = std::pin::pin!(handle.wait());
    tokio::select! {
        () = &mut wait => {}
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            tracing::warn!("second signal: closing remaining connections now");
            control.abort();
            wait.await;
        }
    }
    if let Some(t) = otel {
        // The last requests' spans: exported before exit, bounded by the
        // processor's 5 s shutdown timeout.
        let flushed = tokio::task::spawn_blocking(move || t.shutdown()).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "OpenTelemetry: the last spans could not be exported");
        }
    }
    if let Some(d) = demo {
        for s in &d.sims {
            s.stop();
        }
    }
    Ok(())
}

/// A bug must not print a multi-line panic report with a backtrace hint
/// into the container logs: report it as one JSON line on stderr instead
/// (the log buffer may not get the chance to drain if the process aborts).
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let line = serde_json::json!({
            "level": "ERROR",
            "target": "aoai_lb",
            "message": "internal error",
            "panic": what,
            "location": at,
        });
        eprintln!("{line}");
    }));
}
