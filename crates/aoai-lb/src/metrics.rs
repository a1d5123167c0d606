//! The Prometheus recorder and the catalogue of metrics.
//!
//! The request path records with the `metrics` macros; this module installs
//! the process-wide recorder once, gives every histogram explicit buckets
//! (so they are exported as real, aggregatable histograms rather than
//! summaries) and describes every metric name. Labels are low-cardinality
//! by contract: instance names from the configuration, status classes,
//! outcomes and reasons; never a raw path, a client-chosen deployment or a
//! key.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by final instance (`none` when no backend), status
/// class (`2xx`, `4xx`, `5xx`) and client (`none` before one is known).
pub const REQUESTS_TOTAL: &str = "aoai_lb_requests_total";
/// Upstream attempts by instance and outcome.
pub const UPSTREAM_ATTEMPTS_TOTAL: &str = "aoai_lb_upstream_attempts_total";
/// Whole-request duration, labelled `streamed`.
pub const REQUEST_DURATION_SECONDS: &str = "aoai_lb_request_duration_seconds";
/// Request time not spent waiting on a backend.
pub const OVERHEAD_SECONDS: &str = "aoai_lb_overhead_seconds";
/// Requests currently in flight per instance.
pub const IN_FLIGHT: &str = "aoai_lb_in_flight";
/// Cooldowns started per instance (after a 429).
pub const COOLDOWNS_TOTAL: &str = "aoai_lb_cooldowns_total";
/// 1 while an instance's circuit breaker is open.
pub const BREAKER_OPEN: &str = "aoai_lb_breaker_open";
/// Configuration reloads by `outcome` (`applied`, `rejected`, `unchanged`).
pub const CONFIG_RELOADS_TOTAL: &str = "aoai_lb_config_reloads_total";
/// 1 for the hash of the configuration in use (0 for earlier ones).
pub const CONFIG_INFO: &str = "aoai_lb_config_info";
/// 1 at start-up, plus one per applied reload.
pub const CONFIG_GENERATION: &str = "aoai_lb_config_generation";
/// When the configuration in use was loaded (Unix seconds).
pub const CONFIG_LOADED_TIMESTAMP_SECONDS: &str = "aoai_lb_config_loaded_timestamp_seconds";
/// 1 while an instance can take a request (not cooling down, breaker not
/// open); refreshed at each scrape. This, not `/readyz`, is where "every
/// instance is throttled" shows.
pub const INSTANCE_AVAILABLE: &str = "aoai_lb_instance_available";
/// Requests answered by the gateway itself, by reason.
pub const CLIENT_ERRORS_TOTAL: &str = "aoai_lb_client_errors_total";
/// Requests refused by a client's own permissions and limits, by client
/// and reason (`deployment`, `rpm`, `tpm`, `too_large`, `quota`).
pub const CLIENT_REJECTIONS_TOTAL: &str = "aoai_lb_client_rejections_total";
/// Client connections currently open on the public listener.
pub const OPEN_CONNECTIONS: &str = "aoai_lb_open_connections";
/// Client connections closed at once because the cap was reached.
pub const REJECTED_CONNECTIONS_TOTAL: &str = "aoai_lb_rejected_connections_total";

/// Buckets for whole requests: from a fast embedding to a long generation.
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Buckets for the gateway's own overhead: microseconds to milliseconds.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

/// The recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct MetricsError(String);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process; later calls
/// return the same handle) and starts a thread that runs the recorder's
/// upkeep every 5 s so histogram storage stays bounded.
///
/// # Errors
/// [`MetricsError`] if another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    // Two servers starting at once in one process (tests do this) must not
    // race between setting the global recorder and publishing its handle.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_DURATION_SECONDS.into()),
            REQUEST_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(OVERHEAD_SECONDS.into()), OVERHEAD_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(crate::shared::REDIS_OP_SECONDS.into()),
                crate::shared::REDIS_OP_BUCKETS,
            )
        })
        .map_err(|e| MetricsError(e.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    // Two callers racing here: only the first recorder is installed and the
    // loser gets the winner's handle.
    if metrics::set_global_recorder(recorder).is_err() {
        return HANDLE
            .get()
            .cloned()
            .ok_or_else(|| MetricsError("another recorder is installed".into()));
    }
    let handle = HANDLE.get_or_init(|| handle).clone();
    describe();
    let upkeep = handle.clone();
    let _ = std::thread::Builder::new()
        .name("aoai-lb-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
    Ok(handle)
}

/// Process-wide metric handles used on every request, created on first
/// use (after the recorder is installed) so the hot path skips the
/// registry lookup.
pub struct GlobalMetrics {
    /// `aoai_lb_overhead_seconds`.
    pub overhead: metrics::Histogram,
    /// `aoai_lb_request_duration_seconds{streamed="true"}`.
    pub duration_streamed: metrics::Histogram,
    /// `aoai_lb_request_duration_seconds{streamed="false"}`.
    pub duration_plain: metrics::Histogram,
}

/// The process-wide handles (see [`GlobalMetrics`]).
pub fn global() -> &'static GlobalMetrics {
    static CELL: OnceLock<GlobalMetrics> = OnceLock::new();
    CELL.get_or_init(|| GlobalMetrics {
        overhead: metrics::histogram!(OVERHEAD_SECONDS),
        duration_streamed: metrics::histogram!(REQUEST_DURATION_SECONDS, "streamed" => "true"),
        duration_plain: metrics::histogram!(REQUEST_DURATION_SECONDS, "streamed" => "false"),
    })
}

/// The installed recorder's handle, if any.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

fn describe() {
    crate::shared::describe();
    describe_counter!(
        crate::usage::TOKENS_TOTAL,
        Unit::Count,
        "Tokens of answered inference requests, by client, client-facing deployment, instance, kind (prompt, completion, cached, reasoning) and source (reported by the instance, or estimated with a tokenizer)"
    );
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Requests answered, by final instance (none when no backend was used), status class and client"
    );
    describe_counter!(
        UPSTREAM_ATTEMPTS_TOTAL,
        Unit::Count,
        "Upstream attempts by instance and outcome (ok, client_error, throttled, server_error, timeout, connect_error, backend_auth_error, deployment_not_found)"
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Whole request duration as seen by the client, by whether the response streamed"
    );
    describe_histogram!(
        OVERHEAD_SECONDS,
        Unit::Seconds,
        "Gateway overhead: request time minus time spent waiting on the backend"
    );
    describe_gauge!(
        IN_FLIGHT,
        Unit::Count,
        "Requests currently in flight per instance"
    );
    describe_counter!(
        COOLDOWNS_TOTAL,
        Unit::Count,
        "Cooldowns started per instance after a 429"
    );
    describe_gauge!(
        BREAKER_OPEN,
        Unit::Count,
        "1 while the instance's circuit breaker is open, else 0"
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        Unit::Count,
        "Configuration reloads by outcome: applied, rejected (bad or unreadable document; the running one is kept), unchanged (SIGHUP with the same content)"
    );
    describe_gauge!(
        CONFIG_INFO,
        Unit::Count,
        "1 for the hash (first 16 hex digits of the SHA-256 of the document) of the configuration in use, 0 for earlier ones"
    );
    describe_gauge!(
        CONFIG_GENERATION,
        Unit::Count,
        "Configuration generation: 1 at start-up, plus one per applied reload"
    );
    describe_gauge!(
        CONFIG_LOADED_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "When the configuration in use was loaded, in Unix seconds"
    );
    describe_gauge!(
        INSTANCE_AVAILABLE,
        Unit::Count,
        "1 while the instance can take a request (not cooling down after a 429, breaker not open), else 0; refreshed at each scrape"
    );
    describe_counter!(
        CLIENT_ERRORS_TOTAL,
        Unit::Count,
        "Requests answered by the gateway itself, by reason (unauthorized, body_too_large, bad_request, deployment_not_found, all_cooling, no_backend)"
    );
    describe_counter!(
        CLIENT_REJECTIONS_TOTAL,
        Unit::Count,
        "Requests refused by a client's own permissions and limits, by client and reason (deployment, rpm, tpm, too_large, quota)"
    );
    describe_gauge!(
        OPEN_CONNECTIONS,
        Unit::Count,
        "Client connections currently open on the public listener"
    );
    describe_counter!(
        REJECTED_CONNECTIONS_TOTAL,
        Unit::Count,
        "Client connections closed at once because server.max_connections was reached"
    );
    describe_gauge!(
        crate::steer::LANE_REMAINING_TOKENS,
        Unit::Count,
        "Predicted tokens left in Azure's 60 s window on a lane (instance x upstream deployment); refreshed at each scrape"
    );
    describe_counter!(
        crate::steer::STEER_SKIPS_TOTAL,
        Unit::Count,
        "Instances passed over for lack of predicted rate-limit room, by instance and reason (tokens, requests, utilization)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_histograms_with_buckets_and_descriptions() {
        let h = install().unwrap();
        assert!(install().is_ok(), "a second install returns the handle");
        metrics::histogram!(OVERHEAD_SECONDS).record(0.000_02);
        metrics::counter!(REQUESTS_TOTAL, "instance" => "a", "code" => "2xx").increment(1);
        let text = h.render();
        assert!(
            text.contains("aoai_lb_overhead_seconds_bucket{le=\"0.000025\"} 1"),
            "{text}"
        );
        assert!(text.contains("# HELP aoai_lb_requests_total"), "{text}");
        assert!(
            text.contains("aoai_lb_requests_total{instance=\"a\",code=\"2xx\"} 1"),
            "{text}"
        );
    }
}
