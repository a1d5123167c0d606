//! OpenTelemetry traces on the wire: the real gateway exports to a loopback
//! OTLP receiver implemented here (gRPC over HTTP/2 and HTTP/protobuf),
//! in front of simulated instances whose journals show what went upstream.
// Helpers outside #[test] functions fail the test by panicking, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aoai_lb::config::Config;
use aoai_lb::otel::{Settings, Tracing};
use aoai_lb::secret::Secret;
use aoai_lb::server::ServeOptions;
use aoai_sim::Fault;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

const GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";
const PROMPT: &str = "PROMPT-must-not-be-exported-3f9c";

/// What the receiver got: one entry per export call.
#[derive(Default)]
struct Received {
    /// (path, content-type, raw body) of every export request.
    raw: Vec<(String, String, Bytes)>,
    /// Decoded requests.
    requests: Vec<ExportTraceServiceRequest>,
}

struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Received>>,
}

impl Receiver {
    fn spans(&self) -> Vec<Span> {
        let got = self.got.lock().unwrap();
        got.requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    fn resource_attrs(&self) -> HashMap<String, String> {
        let got = self.got.lock().unwrap();
        got.requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .filter_map(|rs| rs.resource.as_ref())
            .flat_map(|r| attrs(&r.attributes))
            .collect()
    }

    fn raw_bytes(&self) -> Vec<u8> {
        let got = self.got.lock().unwrap();
        got.raw.iter().flat_map(|(_, _, b)| b.to_vec()).collect()
    }
}

/// An OTLP receiver on 127.0.0.1: HTTP/1.1 `POST /v1/traces` with a
/// protobuf body, and gRPC `TraceService/Export` over cleartext HTTP/2,
/// on the same port (the connection's first bytes tell which).
async fn start_receiver() -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Received::default()));
    let store = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let svc = service_fn(move |req| export(req, Arc::clone(&store)));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Receiver { addr, got }
}

type RespBody = BoxBody<Bytes, Infallible>;

async fn export(
    req: Request<Incoming>,
    store: Arc<Mutex<Received>>,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let grpc = ctype.starts_with("application/grpc");
    let mut decoded = Vec::new();
    if grpc {
        assert_eq!(path, GRPC_PATH);
        // Length-prefixed messages: 1 byte compressed flag, 4 bytes length.
        let mut buf = body.clone();
        while buf.remaining() >= 5 {
            let compressed = buf.get_u8();
            assert_eq!(compressed, 0, "the exporter compresses only when asked to");
            let len = buf.get_u32() as usize;
            let msg = buf.split_to(len);
            decoded.push(ExportTraceServiceRequest::decode(msg).unwrap());
        }
    } else {
        assert_eq!(path, "/v1/traces");
        assert_eq!(ctype, "application/x-protobuf");
        decoded.push(ExportTraceServiceRequest::decode(body.clone()).unwrap());
    }
    {
        let mut s = store.lock().unwrap();
        s.raw.push((path, ctype, body));
        s.requests.extend(decoded);
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    if grpc {
        let mut framed = BytesMut::with_capacity(5 + answer.len());
        framed.put_u8(0);
        framed.put_u32(u32::try_from(answer.len()).unwrap());
        framed.put_slice(&answer);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = futures_util::stream::iter([
            Ok::<_, Infallible>(Frame::data(framed.freeze())),
            Ok(Frame::trailers(trailers)),
        ]);
        Ok(Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(frames).boxed())
            .unwrap())
    } else {
        Ok(Response::builder()
            .header("content-type", "application/x-protobuf")
            .body(
                Full::new(Bytes::from(answer))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap())
    }
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn settings(protocol: &str, receiver: &Receiver) -> Settings {
    let vars: HashMap<&str, String> = HashMap::from([
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{}", receiver.addr),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
        ("OTEL_SERVICE_NAME", "aoai-lb-under-test".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=test,team=ai%20platform".to_owned(),
        ),
    ]);
    Settings::from_env(|k| vars.get(k).cloned())
        .unwrap()
        .expect("tracing on")
}

/// The gateway in front of `sims` (sim0 priority 1, sim1 priority 2), with
/// `tracing`.
async fn gateway(
    sims: &[aoai_sim::SimHandle],
    tracing: Option<Arc<Tracing>>,
) -> aoai_lb::server::ServerHandle {
    let doc = config_with(
        sims,
        serde_json::json!({"instances": [{"priority": 1}, {"priority": 2}]}),
    );
    let config = Arc::new(Config::from_json(&doc).unwrap());
    let mut opts = ServeOptions::local(Some(Secret::new(CLIENT_KEY)));
    opts.tracing = tracing;
    aoai_lb::server::spawn(config, opts).await.unwrap()
}

async fn chat_with_traceparent(
    gw: &aoai_lb::server::ServerHandle,
    traceparent: Option<&str>,
) -> (StatusCode, Bytes) {
    let mut headers = auth();
    if let Some(tp) = traceparent {
        headers.push(("traceparent", tp.to_owned()));
    }
    headers.push(("tracestate", "vendor=opaque".to_owned()));
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
    })
    .to_string();
    let (s, _, b) = send(
        Method::POST,
        &format!("http://{}{}", gw.local_addr(), chat_path("gpt-4o")),
        &headers,
        body,
    )
    .await;
    (s, b)
}

async fn flush(t: &Arc<Tracing>) {
    let t = Arc::clone(t);
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .unwrap()
        .expect("export succeeds");
}

/// Sends one chat with a client `traceparent` through a gateway exporting
/// over `protocol`; sim0 answers 429, so sim1 serves it after a failover.
/// Checks the span tree, the attributes, propagation and secrecy.
async fn exports_the_request_and_attempt_spans(protocol: &str) {
    let receiver = start_receiver().await;
    let sims = sims(2).await;
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 429,
        body: None,
        retry_after_ms: Some(50),
    });
    let tracing = Tracing::start(&settings(protocol, &receiver)).unwrap();
    let gw = gateway(&sims, Some(Arc::clone(&tracing))).await;
    let client_tp = format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01");
    let (status, answer) = chat_with_traceparent(&gw, Some(&client_tp)).await;
    assert_eq!(status, StatusCode::OK);
    flush(&tracing).await;

    let spans = receiver.spans();
    assert_eq!(
        spans.len(),
        3,
        "one request span and two attempts: {spans:#?}"
    );
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(server.len(), 1);
    let root = server[0];
    assert_eq!(
        hex(&root.trace_id),
        CLIENT_TRACE_ID,
        "the client's trace continues"
    );
    assert_eq!(hex(&root.parent_span_id), CLIENT_SPAN_ID);
    assert_eq!(root.name, "chat gpt-4o");
    let ra = attrs(&root.attributes);
    assert_eq!(ra["gen_ai.provider.name"], "azure.ai.openai");
    assert_eq!(ra["gen_ai.system"], "az.ai.openai");
    assert_eq!(ra["gen_ai.operation.name"], "chat");
    assert_eq!(ra["gen_ai.request.model"], "gpt-4o");
    assert_eq!(ra["http.request.method"], "POST");
    assert_eq!(
        ra["url.path"],
        "/openai/deployments/gpt-4o/chat/completions"
    );
    assert_eq!(ra["http.response.status_code"], "200");
    assert_eq!(ra["aoai_lb.instance"], "sim1");
    assert_eq!(ra["aoai_lb.attempts"], "2");
    assert!(ra.contains_key("azure.service.request.id"), "{ra:?}");

    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2);
    for (a, (instance, outcome, code)) in attempts
        .iter()
        .zip([("sim0", "throttled", "429"), ("sim1", "ok", "200")])
    {
        assert_eq!(a.trace_id, root.trace_id);
        assert_eq!(
            a.parent_span_id, root.span_id,
            "attempts are children of the request"
        );
        assert_eq!(a.name, "chat gpt-4o");
        let aa = attrs(&a.attributes);
        assert_eq!(aa["aoai_lb.instance"], instance);
        assert_eq!(aa["aoai_lb.outcome"], outcome);
        assert_eq!(aa["http.response.status_code"], code);
        assert_eq!(aa["server.address"], "127.0.0.1");
        assert_eq!(aa["gen_ai.provider.name"], "azure.ai.openai");
        assert_eq!(aa["gen_ai.request.model"], "gpt-4o");
        assert!(a.start_time_unix_nano >= root.start_time_unix_nano);
        assert!(a.end_time_unix_nano <= root.end_time_unix_nano);
        assert!(a.end_time_unix_nano >= a.start_time_unix_nano);

        // Propagation: the instance saw this trace, with this attempt's
        // span as its parent, and the client's tracestate untouched.
        let sim = &sims[usize::from(instance == "sim1")];
        let journal = sim.journal();
        let entry = journal.last().expect("the instance got the request");
        assert_eq!(
            entry.header("traceparent"),
            Some(format!("00-{CLIENT_TRACE_ID}-{}-01", hex(&a.span_id)).as_str()),
        );
        assert_eq!(entry.header("tracestate"), Some("vendor=opaque"));
    }
    let throttled = attrs(&attempts[0].attributes);
    assert_eq!(throttled["error.type"], "throttled");

    // Tokens: exactly what the instance reported, on the request and on
    // the attempt that served it, not on the throttled one.
    let reply: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    let (prompt, completion) = (
        reply["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap()
            .to_string(),
        reply["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            .to_string(),
    );
    let served = attrs(&attempts[1].attributes);
    for a in [&ra, &served] {
        assert_eq!(a["gen_ai.usage.input_tokens"], prompt);
        assert_eq!(a["gen_ai.usage.output_tokens"], completion);
        assert_eq!(a["aoai_lb.usage.source"], "reported");
    }
    assert!(!throttled.contains_key("gen_ai.usage.input_tokens"));

    let res = receiver.resource_attrs();
    assert_eq!(res["service.name"], "aoai-lb-under-test");
    assert_eq!(res["deployment.environment"], "test");
    assert_eq!(res["team"], "ai platform");

    // Nothing secret or private left the process.
    let raw = receiver.raw_bytes();
    let completion: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    let completion = completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        completion.len() >= 8,
        "a completion long enough to search for"
    );
    for secret in [
        CLIENT_KEY,
        sims[0].config().api_key.as_str(),
        PROMPT,
        completion.as_str(),
        "api-version",
    ] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret:?} was exported"
        );
    }
    gw.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exports_a_request_span_with_one_child_per_attempt() {
    exports_the_request_and_attempt_spans("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_exports_a_request_span_with_one_child_per_attempt() {
    exports_the_request_and_attempt_spans("http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_a_new_trace_without_a_client_traceparent_and_propagates_it() {
    let receiver = start_receiver().await;
    let sims = sims(2).await;
    let tracing = Tracing::start(&settings("grpc", &receiver)).unwrap();
    let gw = gateway(&sims, Some(Arc::clone(&tracing))).await;
    let (status, _) = chat_with_traceparent(&gw, None).await;
    assert_eq!(status, StatusCode::OK);
    flush(&tracing).await;
    let spans = receiver.spans();
    assert_eq!(spans.len(), 2);
    let root = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert!(root.parent_span_id.is_empty() || root.parent_span_id.iter().all(|b| *b == 0));
    let attempt = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    let tp = sims[0]
        .journal()
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_owned();
    assert_eq!(
        tp,
        format!("00-{}-{}-01", hex(&root.trace_id), hex(&attempt.span_id))
    );
    gw.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_client_trace_is_propagated_but_not_exported() {
    let receiver = start_receiver().await;
    let sims = sims(2).await;
    let tracing = Tracing::start(&settings("http/protobuf", &receiver)).unwrap();
    let gw = gateway(&sims, Some(Arc::clone(&tracing))).await;
    let tp = format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-00");
    let (status, _) = chat_with_traceparent(&gw, Some(&tp)).await;
    assert_eq!(status, StatusCode::OK);
    flush(&tracing).await;
    assert!(receiver.spans().is_empty());
    let sent = sims[0]
        .journal()
        .last()
        .unwrap()
        .header("traceparent")
        .unwrap()
        .to_owned();
    assert!(
        sent.starts_with(&format!("00-{CLIENT_TRACE_ID}-")),
        "{sent}"
    );
    assert!(
        sent.ends_with("-00"),
        "the decision not to sample goes upstream: {sent}"
    );
    gw.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_off_exports_nothing_and_passes_the_client_traceparent_through() {
    let receiver = start_receiver().await;
    // Everything but an endpoint: tracing stays off.
    let vars: HashMap<&str, String> = HashMap::from([
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
        ("OTEL_SERVICE_NAME", "aoai-lb-under-test".to_owned()),
    ]);
    assert!(
        Settings::from_env(|k| vars.get(k).cloned())
            .unwrap()
            .is_none()
    );
    let sims = sims(2).await;
    let gw = gateway(&sims, None).await;
    let tp = format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01");
    for _ in 0..5 {
        let (status, _) = chat_with_traceparent(&gw, Some(&tp)).await;
        assert_eq!(status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.raw_bytes().is_empty(), "nothing may be exported");
    assert_eq!(
        sims[0].journal().last().unwrap().header("traceparent"),
        Some(tp.as_str()),
        "a transparent proxy: the client's header goes up unchanged"
    );
    gw.shutdown();
}
