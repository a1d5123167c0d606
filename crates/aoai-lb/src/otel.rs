//! OpenTelemetry traces, built from the access record when a request ends.
//!
//! Owns: reading the standard `OTEL_*` variables, W3C trace-context in and
//! out, turning one [`AccessRecord`] into one SERVER span plus one CLIENT
//! span per upstream attempt, and handing them to the SDK's batch processor
//! (which exports over OTLP gRPC or HTTP/protobuf on its own thread).
//!
//! Why after the fact: the record already holds everything a span needs
//! (attempts with instance, outcome, status and time), so the request path
//! does no tracing work beyond drawing ids at the start and writing one
//! `traceparent` header per attempt. With tracing off (no endpoint set) the
//! record carries `None` and nothing at all happens.
//!
//! Never in a span: keys, tokens, prompts, completions, query strings or
//! any header other than `apim-request-id` and the gateway's request id.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};

use crate::log::{AccessRecord, Attempt};

/// W3C trace-context header, read from clients and written upstream.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `gen_ai.provider.name` for every span (GenAI semantic conventions).
pub const PROVIDER_NAME: &str = "azure.ai.openai";
/// The older `gen_ai.system` value the conventions define for Azure
/// OpenAI, still read by many back ends.
pub const SYSTEM: &str = "az.ai.openai";

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (what the Container Apps managed agent speaks).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (the specification's default).
    HttpProtobuf,
}

/// Which traces are recorded (`OTEL_TRACES_SAMPLER`, `..._ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// A share of the traces, chosen by trace id.
    Ratio(f64),
    /// Follow the client's `traceparent` sampled flag; the inner sampler
    /// decides for requests without one. The default (`parentbased_always_on`).
    ParentBased(ParentRoot),
}

/// The root decision of a parent-based sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParentRoot {
    /// Record every new trace.
    AlwaysOn,
    /// Record no new trace.
    AlwaysOff,
    /// Record a share of new traces.
    Ratio(f64),
}

/// Tracing settings from the standard variables.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Where spans go. For HTTP, the full URL including `/v1/traces`.
    pub endpoint: String,
    /// gRPC or HTTP/protobuf.
    pub protocol: Protocol,
    /// `service.name` (default `aoai-lb`).
    pub service_name: String,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
    /// Which traces are recorded.
    pub sampler: Sampler,
}

/// A tracing variable with a value the gateway cannot use.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// A variable has a value outside its allowed set.
    #[error("{var}: {message}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// What is wrong, and what is accepted.
        message: String,
    },
    /// The exporter could not be built (bad endpoint URL, TLS set-up).
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the exporter: {0}")]
    Exporter(String),
}

impl Settings {
    /// Reads the standard variables through `get` (`std::env::var` in the
    /// binary; a map in tests).
    ///
    /// Tracing is on only when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set and not empty, and neither
    /// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says
    /// otherwise. `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`)
    /// is `grpc` or `http/protobuf` (the default, as in the specification).
    /// For HTTP, `/v1/traces` is appended to `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// the traces-specific variable is used as is.
    ///
    /// # Errors
    /// A protocol, sampler, exporter or resource value that cannot be used,
    /// named in the message.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, OtelError> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match get("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(OtelError::Invalid {
                    var: "OTEL_TRACES_EXPORTER",
                    message: format!("{other:?} is not supported; use otlp or none"),
                });
            }
        }
        let traces_endpoint = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let base_endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT");
        if traces_endpoint.is_none() && base_endpoint.is_none() {
            return Ok(None);
        }
        let (var, proto) = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(p) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(p)),
            None => (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                get("OTEL_EXPORTER_OTLP_PROTOCOL"),
            ),
        };
        let protocol = match proto.as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                return Err(OtelError::Invalid {
                    var,
                    message: format!("{other:?} is not supported; use grpc or http/protobuf"),
                });
            }
        };
        let endpoint = match (traces_endpoint, base_endpoint, protocol) {
            (Some(t), _, _) => t,
            (None, Some(b), Protocol::HttpProtobuf) => {
                format!("{}/v1/traces", b.trim_end_matches('/'))
            }
            (None, Some(b), Protocol::Grpc) => b,
            (None, None, _) => return Ok(None),
        };
        let mut resource = parse_resource(get("OTEL_RESOURCE_ATTRIBUTES").as_deref())?;
        // OTEL_SERVICE_NAME wins over a service.name in the attributes.
        let from_attrs = resource
            .iter()
            .position(|(k, _)| k == "service.name")
            .map(|i| resource.remove(i).1);
        let service_name = get("OTEL_SERVICE_NAME")
            .or(from_attrs)
            .unwrap_or_else(|| "aoai-lb".to_owned());
        let sampler = parse_sampler(
            get("OTEL_TRACES_SAMPLER").as_deref(),
            get("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?;
        Ok(Some(Settings {
            endpoint,
            protocol,
            service_name,
            resource,
            sampler,
        }))
    }
}

/// `key1=value1,key2=value2`, values percent-decoded (W3C baggage octets).
fn parse_resource(raw: Option<&str>) -> Result<Vec<(String, String)>, OtelError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(OtelError::Invalid {
                var: "OTEL_RESOURCE_ATTRIBUTES",
                message: format!("{pair:?} is not key=value"),
            });
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(OtelError::Invalid {
                var: "OTEL_RESOURCE_ATTRIBUTES",
                message: format!("{pair:?} has an empty key"),
            });
        }
        let v =
            url::form_urlencoded::parse(format!("v={}", v.trim().replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
        out.push((k.to_owned(), v));
    }
    Ok(out)
}

fn parse_sampler(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, OtelError> {
    let ratio = || -> Result<f64, OtelError> {
        match arg {
            None => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| OtelError::Invalid {
                    var: "OTEL_TRACES_SAMPLER_ARG",
                    message: format!("{a:?} is not a ratio between 0 and 1"),
                }),
        }
    };
    Ok(match name {
        None | Some("parentbased_always_on") => Sampler::ParentBased(ParentRoot::AlwaysOn),
        Some("parentbased_always_off") => Sampler::ParentBased(ParentRoot::AlwaysOff),
        Some("parentbased_traceidratio") => Sampler::ParentBased(ParentRoot::Ratio(ratio()?)),
        Some("always_on") => Sampler::AlwaysOn,
        Some("always_off") => Sampler::AlwaysOff,
        Some("traceidratio") => Sampler::Ratio(ratio()?),
        Some(other) => {
            return Err(OtelError::Invalid {
                var: "OTEL_TRACES_SAMPLER",
                message: format!(
                    "{other:?} is not supported; use always_on, always_off, traceidratio or their parentbased_ forms"
                ),
            });
        }
    })
}

impl Sampler {
    fn sample(self, trace_id: u128, parent_sampled: Option<bool>) -> bool {
        let by_ratio = |r: f64| {
            // The low 63 bits of the trace id against the ratio, so every
            // replica and every hop decides the same for one trace.
            let x = (trace_id as u64) >> 1;
            (x as f64) < r * (1u64 << 63) as f64
        };
        match (self, parent_sampled) {
            (Sampler::AlwaysOn, _) => true,
            (Sampler::AlwaysOff, _) => false,
            (Sampler::Ratio(r), _) => by_ratio(r),
            (Sampler::ParentBased(_), Some(p)) => p,
            (Sampler::ParentBased(ParentRoot::AlwaysOn), None) => true,
            (Sampler::ParentBased(ParentRoot::AlwaysOff), None) => false,
            (Sampler::ParentBased(ParentRoot::Ratio(r)), None) => by_ratio(r),
        }
    }
}

/// The running tracer: a batch processor over an OTLP exporter. One per
/// process; cheap to share (`Arc`).
pub struct Tracing {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    sampler: Sampler,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing")
            .field("sampler", &self.sampler)
            .finish_non_exhaustive()
    }
}

impl Tracing {
    /// Builds the exporter and its batch processor. Must run inside the
    /// tokio runtime that will carry the exports (the gRPC channel and the
    /// HTTP client run their I/O there; the processor's own thread only
    /// waits). Nothing connects until the first batch.
    ///
    /// # Errors
    /// [`OtelError::Exporter`] for an endpoint the exporter rejects.
    pub fn start(settings: &Settings) -> Result<Arc<Tracing>, OtelError> {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};

        let exporter = match settings.protocol {
            Protocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(settings.endpoint.clone());
                if settings.endpoint.starts_with("https://") {
                    b = b.with_tls_config(
                        tonic::transport::ClientTlsConfig::new().with_webpki_roots(),
                    );
                }
                b.build()
            }
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(settings.endpoint.clone())
                .with_http_client(OtlpHttpClient::new()?)
                .build(),
        }
        .map_err(|e| OtelError::Exporter(e.to_string()))?;

        let mut attrs: Vec<KeyValue> = settings
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        let resource = Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .with_attributes(attrs)
            .build();
        let mut processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().build())
            .build();
        processor.set_resource(&resource);
        Ok(Arc::new(Tracing {
            processor,
            scope: InstrumentationScope::builder("aoai-lb")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            sampler: settings.sampler,
        }))
    }

    /// The trace context of a request just received: continues the
    /// client's `traceparent` when it has a valid one, else starts a new
    /// trace. Draws the ids the request's spans and upstream headers use.
    pub fn begin(self: &Arc<Self>, headers: &HeaderMap) -> RequestTrace {
        let parent = headers.get(&TRACEPARENT).and_then(parse_traceparent);
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let sampled = self.sampler.sample(trace_id, parent.map(|p| p.sampled));
        RequestTrace {
            tracing: Arc::clone(self),
            trace_id,
            span_id: new_span_id(),
            parent_span_id: parent.map(|p| p.span_id),
            sampled,
            wall_start: SystemTime::now(),
            start: Instant::now(),
            client: None,
        }
    }

    /// Exports what is queued and waits for it (bounded by the exporter's
    /// timeout). Blocks the calling thread: call it from a blocking task.
    ///
    /// # Errors
    /// The SDK's export or timeout error, as text.
    pub fn force_flush(&self) -> Result<(), String> {
        self.processor.force_flush().map_err(|e| e.to_string())
    }

    /// Exports what is queued and stops the processor's thread. Blocks
    /// like [`Tracing::force_flush`].
    ///
    /// # Errors
    /// The SDK's error, as text.
    pub fn shutdown(&self) -> Result<(), String> {
        self.processor
            .shutdown_with_timeout(Duration::from_secs(5))
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parent {
    trace_id: u128,
    span_id: u64,
    sampled: bool,
}

/// `version-traceid-parentid-flags`, as W3C Trace Context level 1 reads
/// it: version `ff` and all-zero ids are invalid; a future version may
/// append fields after the flags.
fn parse_traceparent(v: &HeaderValue) -> Option<Parent> {
    let s = v.to_str().ok()?.trim();
    let b = s.as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = u8::from_str_radix(&s[0..2], 16).ok()?;
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let lower_hex = |t: &str| t.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let (tid, sid, flags) = (&s[3..35], &s[36..52], &s[53..55]);
    if !lower_hex(tid) || !lower_hex(sid) || !lower_hex(flags) || !lower_hex(&s[0..2]) {
        return None;
    }
    let trace_id = u128::from_str_radix(tid, 16).ok()?;
    let span_id = u64::from_str_radix(sid, 16).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

fn new_trace_id() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn new_span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// The span id of the attempt on instance `index`: derived, not stored,
/// so the header written while sending and the span built at the end
/// agree without the attempt list carrying ids. Each instance is tried at
/// most once per request.
fn attempt_span_id(request_span: u64, index: usize) -> u64 {
    // splitmix64 finaliser: distinct inputs give well-spread outputs.
    let mut z = request_span ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 { 1 } else { z }
}

/// One request's trace context, carried in its [`AccessRecord`] while
/// tracing is on. Cloning costs one reference count.
#[derive(Clone)]
pub struct RequestTrace {
    tracing: Arc<Tracing>,
    trace_id: u128,
    span_id: u64,
    parent_span_id: Option<u64>,
    sampled: bool,
    wall_start: SystemTime,
    start: Instant,
    /// The named client the request came from, once identified.
    pub client: Option<Arc<crate::clients::Client>>,
}

impl RequestTrace {
    /// The `traceparent` to send on the attempt to instance `index`: this
    /// trace, the attempt's span as parent, the sampling decision.
    pub fn traceparent(&self, index: usize) -> HeaderValue {
        let v = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            attempt_span_id(self.span_id, index),
            u8::from(self.sampled)
        );
        HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The trace id, as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// Builds the request's spans from the finished record and queues them
    /// for export. Called once, where the record is written; does nothing
    /// for an unsampled trace.
    pub fn export(&self, rec: &AccessRecord) {
        if !self.sampled {
            return;
        }
        let t = &*self.tracing;
        let end = self.wall_start + Duration::from_secs_f64(rec.total_ms.max(0.0) / 1000.0);
        let operation = operation_name(&rec.path);

        let mut attrs = genai_attributes(16, rec, operation);
        attrs.push(KeyValue::new(
            "http.request.method",
            rec.method.as_str().to_owned(),
        ));
        attrs.push(KeyValue::new("url.path", rec.path.clone()));
        attrs.push(KeyValue::new(
            "http.response.status_code",
            i64::from(rec.status),
        ));
        if let Ok(id) = rec.request_id.to_str() {
            attrs.push(KeyValue::new("aoai_lb.request_id", id.to_owned()));
        }
        if let Some(id) = rec.apim_request_id.as_ref().and_then(|v| v.to_str().ok()) {
            attrs.push(KeyValue::new("azure.service.request.id", id.to_owned()));
        }
        if let Some(i) = &rec.instance {
            attrs.push(KeyValue::new("aoai_lb.instance", i.as_str().to_owned()));
        }
        if let Some(c) = &self.client {
            attrs.push(KeyValue::new("aoai_lb.client", c.name.to_string()));
        }
        push_usage(&mut attrs, rec);
        attrs.push(KeyValue::new("aoai_lb.attempts", rec.attempts.len() as i64));
        attrs.push(KeyValue::new("aoai_lb.streamed", rec.streamed));
        let failed = rec.status >= 500 || rec.error.is_some();
        if let Some(e) = rec.error {
            attrs.push(KeyValue::new("error.type", e));
        } else if rec.status >= 500 {
            attrs.push(KeyValue::new("error.type", rec.status.to_string()));
        }
        t.processor.on_end(self.span(
            rec,
            operation,
            Span {
                id: self.span_id,
                // The client's span, when it sent a `traceparent`.
                parent: self.parent_span_id,
                remote_parent: true,
                kind: SpanKind::Server,
                start: self.wall_start,
                end,
                attrs,
                failed,
            },
        ));
        for a in &rec.attempts {
            t.processor.on_end(self.attempt_span(rec, a, operation));
        }
    }

    fn attempt_span(
        &self,
        rec: &AccessRecord,
        a: &Attempt,
        operation: Option<&'static str>,
    ) -> SpanData {
        let backend = &a.instance.0;
        let start = self.wall_start + a.started.saturating_duration_since(self.start);
        let end = start + Duration::from_secs_f64(a.ms.max(0.0) / 1000.0);
        let mut attrs = genai_attributes(12, rec, operation);
        if let Some(host) = backend.config.url.host_str() {
            attrs.push(KeyValue::new("server.address", host.to_owned()));
        }
        if let Some(port) = backend.config.url.port_or_known_default() {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        attrs.push(KeyValue::new(
            "aoai_lb.instance",
            a.instance.as_str().to_owned(),
        ));
        attrs.push(KeyValue::new("aoai_lb.outcome", a.outcome));
        if let Some(s) = a.status {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        let failed = a.outcome != "ok";
        if failed {
            attrs.push(KeyValue::new("error.type", a.outcome));
        }
        // The tokens belong to the attempt whose answer the client got.
        if !failed
            && rec
                .instance
                .as_ref()
                .is_some_and(|i| Arc::ptr_eq(&i.0, backend))
        {
            push_usage(&mut attrs, rec);
        }
        self.span(
            rec,
            operation,
            Span {
                id: attempt_span_id(self.span_id, backend.index),
                parent: Some(self.span_id),
                remote_parent: false,
                kind: SpanKind::Client,
                start,
                end,
                attrs,
                failed,
            },
        )
    }

    /// A finished span of this (sampled) trace, named `{operation}
    /// {deployment}` for inference (the GenAI convention), else after the
    /// method. A failed span has an error status.
    fn span(&self, rec: &AccessRecord, operation: Option<&'static str>, s: Span) -> SpanData {
        let name: Cow<'static, str> = match (operation, &rec.deployment) {
            (Some(op), Some(dep)) => format!("{op} {dep}").into(),
            _ => rec.method.as_str().to_owned().into(),
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(self.trace_id.to_be_bytes()),
                SpanId::from_bytes(s.id.to_be_bytes()),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::from_bytes(s.parent.unwrap_or(0).to_be_bytes()),
            parent_span_is_remote: s.remote_parent && s.parent.is_some(),
            span_kind: s.kind,
            name,
            start_time: s.start,
            end_time: s.end,
            attributes: s.attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if s.failed {
                Status::error("")
            } else {
                Status::Unset
            },
            instrumentation_scope: self.tracing.scope.clone(),
        }
    }
}

/// What differs between the request's span and its attempts' spans.
struct Span {
    id: u64,
    /// `None`: a root span.
    parent: Option<u64>,
    /// The parent is in another process.
    remote_parent: bool,
    kind: SpanKind,
    start: SystemTime,
    end: SystemTime,
    attrs: Vec<KeyValue>,
    failed: bool,
}

/// The GenAI attributes every span of a request starts with (provider,
/// system, operation, requested model), in room for `capacity`.
fn genai_attributes(
    capacity: usize,
    rec: &AccessRecord,
    operation: Option<&'static str>,
) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(capacity);
    attrs.push(KeyValue::new("gen_ai.provider.name", PROVIDER_NAME));
    attrs.push(KeyValue::new("gen_ai.system", SYSTEM));
    if let Some(op) = operation {
        attrs.push(KeyValue::new("gen_ai.operation.name", op));
    }
    if let Some(dep) = &rec.deployment {
        attrs.push(KeyValue::new("gen_ai.request.model", dep.clone()));
    }
    attrs
}

/// `gen_ai.usage.*` from the record's exact usage (or the gateway's
/// estimate, which `aoai_lb.usage.source` says).
fn push_usage(attrs: &mut Vec<KeyValue>, rec: &AccessRecord) {
    if let Some(u) = &rec.usage {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        attrs.push(KeyValue::new("gen_ai.usage.input_tokens", n(u.prompt)));
        attrs.push(KeyValue::new("gen_ai.usage.output_tokens", n(u.completion)));
        attrs.push(KeyValue::new("aoai_lb.usage.source", u.source.as_str()));
    }
}

/// `gen_ai.operation.name` for an inference path; `None` for the rest
/// (files, batches, ...), whose spans carry no GenAI operation.
pub fn operation_name(path: &str) -> Option<&'static str> {
    let p = path.trim_end_matches('/');
    if p.ends_with("/chat/completions") {
        Some("chat")
    } else if p.ends_with("/completions") {
        Some("text_completion")
    } else if p.ends_with("/embeddings") {
        Some("embeddings")
    } else if p.ends_with("/responses") {
        // The Responses API generates a model turn like chat does.
        Some("chat")
    } else {
        None
    }
}

/// The HTTP client of the OTLP/HTTP exporter: hyper over rustls (webpki
/// roots), run on the gateway's runtime. The SDK calls it from its own
/// thread, so each export is spawned onto the runtime and awaited there.
struct OtlpHttpClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<Bytes>,
    >,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for OtlpHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OtlpHttpClient")
    }
}

impl OtlpHttpClient {
    fn new() -> Result<Self, OtelError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| OtelError::Exporter("no async runtime".to_owned()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| OtelError::Exporter(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        Ok(Self { client, runtime })
    }
}

/// Largest OTLP response body read (the collector's answer is tiny).
const MAX_EXPORT_RESPONSE: usize = 1 << 20;

impl opentelemetry_http::HttpClient for OtlpHttpClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: http::Request<Bytes>,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<http::Response<Bytes>, opentelemetry_http::HttpError>>
                + Send
                + 'b,
        >,
    >
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            use http_body_util::BodyExt;
            let (parts, body) = request.into_parts();
            let req = http::Request::from_parts(parts, http_body_util::Full::new(body));
            let resp = client.request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_EXPORT_RESPONSE)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        });
        Box::pin(async move { task.await? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn tracing_is_off_without_an_endpoint() {
        assert_eq!(Settings::from_env(env(&[])).unwrap(), None);
        let only_name = env(&[
            ("OTEL_SERVICE_NAME", "gw"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert_eq!(Settings::from_env(only_name).unwrap(), None);
        let empty = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]);
        assert_eq!(Settings::from_env(empty).unwrap(), None);
    }

    #[test]
    fn sdk_disabled_or_exporter_none_turn_tracing_off() {
        for (k, v) in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let e = env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                (k, v),
            ]);
            assert_eq!(Settings::from_env(e).unwrap(), None, "{k}={v}");
        }
    }

    #[test]
    fn reads_the_standard_variables() {
        let s = Settings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "gateway-eu"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod, team=ai%20platform,service.name=x",
            ),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://collector:4317");
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(s.service_name, "gateway-eu");
        assert_eq!(
            s.resource,
            vec![
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "ai platform".to_owned())
            ]
        );
        assert_eq!(s.sampler, Sampler::ParentBased(ParentRoot::AlwaysOn));
    }

    #[test]
    fn http_protobuf_is_the_default_and_appends_the_traces_path() {
        let s = Settings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]))
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.endpoint, "http://c:4318/v1/traces");
        assert_eq!(s.service_name, "aoai-lb");
        let s = Settings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/custom"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://t:9/custom");
    }

    #[test]
    fn rejects_an_unknown_protocol_naming_the_variable() {
        let e = Settings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL:"), "{e}");
        assert!(e.contains("grpc or http/protobuf"), "{e}");
    }

    #[test]
    fn rejects_bad_resource_attributes_and_sampler_values() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let e =
            Settings::from_env(env(&[base, ("OTEL_RESOURCE_ATTRIBUTES", "novalue")])).unwrap_err();
        assert!(
            e.to_string().starts_with("OTEL_RESOURCE_ATTRIBUTES:"),
            "{e}"
        );
        let e = Settings::from_env(env(&[base, ("OTEL_TRACES_SAMPLER", "sometimes")])).unwrap_err();
        assert!(e.to_string().starts_with("OTEL_TRACES_SAMPLER:"), "{e}");
        let e = Settings::from_env(env(&[
            base,
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]))
        .unwrap_err();
        assert!(e.to_string().starts_with("OTEL_TRACES_SAMPLER_ARG:"), "{e}");
    }

    #[test]
    fn parses_valid_traceparents_only() {
        let ok =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let p = parse_traceparent(&ok).unwrap();
        assert_eq!(p.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(p.span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(p.sampled);
        let unsampled =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(!parse_traceparent(&unsampled).unwrap().sampled);
        let future = HeaderValue::from_static(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        );
        assert!(parse_traceparent(&future).is_some());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(
                parse_traceparent(&HeaderValue::from_static(bad)).is_none(),
                "{bad}"
            );
        }
    }

    #[test]
    fn attempt_span_ids_differ_per_instance_and_are_stable() {
        let a = attempt_span_id(42, 0);
        assert_eq!(a, attempt_span_id(42, 0));
        assert_ne!(a, attempt_span_id(42, 1));
        assert_ne!(a, attempt_span_id(43, 0));
        assert_ne!(a, 42);
    }

    #[test]
    fn parent_based_sampling_follows_the_client() {
        let s = Sampler::ParentBased(ParentRoot::AlwaysOn);
        assert!(s.sample(7, None));
        assert!(s.sample(7, Some(true)));
        assert!(!s.sample(7, Some(false)));
        assert!(!Sampler::AlwaysOff.sample(7, Some(true)));
        let half = Sampler::Ratio(0.5);
        let kept = (0..10_000u128)
            .filter(|i| {
                half.sample(
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                    None,
                )
            })
            .count();
        assert!((4_000..6_000).contains(&kept), "{kept}");
    }

    #[test]
    fn names_the_genai_operation_from_the_path() {
        assert_eq!(
            operation_name("/openai/deployments/g/chat/completions"),
            Some("chat")
        );
        assert_eq!(operation_name("/openai/v1/chat/completions"), Some("chat"));
        assert_eq!(
            operation_name("/openai/deployments/g/completions"),
            Some("text_completion")
        );
        assert_eq!(
            operation_name("/openai/deployments/e/embeddings"),
            Some("embeddings")
        );
        assert_eq!(operation_name("/openai/v1/responses"), Some("chat"));
        assert_eq!(operation_name("/openai/files"), None);
    }
}
