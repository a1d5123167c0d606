//! Shared test harness: a real gateway on 127.0.0.1 in front of in-process
//! aoai-sim instances, a small HTTP client that records when each chunk
//! arrives, and a runner for the real `aoai-lb` binary that captures its
//! output lines with bounded waits.
//!
//! Every helper talks to 127.0.0.1 only, and every wait is bounded.

#![allow(dead_code)]
// A harness failure is a test failure: panicking with a message is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aoai_lb::config::Config;
use aoai_lb::secret::Secret;
use aoai_lb::server::{ServeOptions, ServerHandle};
use aoai_sim::SimHandle;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The client key most tests configure.
pub const CLIENT_KEY: &str = "test-client-key-5b1f0c";
/// Upper bound on any single request in a test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running gateway (public and admin listeners on ephemeral ports).
pub struct TestGateway {
    pub handle: ServerHandle,
    pub config: Arc<Config>,
}

impl TestGateway {
    /// `http://127.0.0.1:PORT` of the public listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.handle.local_addr())
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.handle.admin_addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// GET `path` on the admin listener: asserts 200, returns the body.
    pub async fn admin_get(&self, path: &str) -> String {
        get_ok(&format!("{}{path}", self.admin_url())).await
    }

    /// GET `path` on the admin listener: asserts 200, returns the JSON body.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        get_json(&format!("{}{path}", self.admin_url())).await
    }

    /// The Prometheus text of `/metrics` (see [`metric`] and [`metric_sum`]).
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await
    }

    /// Graceful shutdown, waiting (bounded by the grace period) for it to end.
    pub async fn shutdown(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.handle.wait()).await;
    }
}

/// Starts the real server with `config_json`. `client_key: None` runs in
/// unauthenticated mode. Panics (failing the test) on a bad document.
pub async fn start_gateway(config_json: &str, client_key: Option<&str>) -> TestGateway {
    start_gateway_with(config_json, client_key, |_| {}).await
}

/// [`start_gateway`], with `tune` setting what a test needs in the server
/// options first (a test clock, an Azure environment, a watched file).
pub async fn start_gateway_with(
    config_json: &str,
    client_key: Option<&str>,
    tune: impl FnOnce(&mut ServeOptions),
) -> TestGateway {
    let config = Arc::new(Config::from_json(config_json).expect("valid test config"));
    let mut opts = ServeOptions::local(client_key.map(Secret::new));
    tune(&mut opts);
    let handle = aoai_lb::server::spawn(config.clone(), opts)
        .await
        .expect("gateway starts");
    TestGateway { handle, config }
}

/// `n` simulated instances named `sim0`, `sim1`, ... with default settings
/// (key `sim-key`, any deployment, no latency).
pub async fn sims(n: usize) -> Vec<SimHandle> {
    start_sims(
        (0..n)
            .map(|i| aoai_sim::InstanceConfig::new(format!("sim{i}")))
            .collect(),
    )
    .await
}

/// Simulated instances with explicit settings.
pub async fn start_sims(cfgs: Vec<aoai_sim::InstanceConfig>) -> Vec<SimHandle> {
    aoai_sim::start(cfgs).await.expect("sims start")
}

/// The seed-shaped document for `sims`: one instance per sim, same name and
/// key, default priority and weight.
pub fn config_for(sims: &[SimHandle]) -> String {
    config_with(sims, serde_json::json!({}))
}

/// Like [`config_for`], with `extra` merged in: top-level keys (e.g.
/// `"timeouts"`) are added, and `extra["instances"]`, if an array, is
/// merged field by field into the instances in order (e.g. priorities).
pub fn config_with(sims: &[SimHandle], extra: serde_json::Value) -> String {
    let mut instances: Vec<serde_json::Value> = sims
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name(),
                "url": s.url(),
                "api_key": s.config().api_key,
            })
        })
        .collect();
    let mut doc = serde_json::Map::new();
    if let serde_json::Value::Object(extra) = extra {
        for (k, v) in extra {
            if k == "instances" {
                if let serde_json::Value::Array(overrides) = v {
                    for (inst, o) in instances.iter_mut().zip(overrides) {
                        if let (Some(inst), serde_json::Value::Object(o)) =
                            (inst.as_object_mut(), o)
                        {
                            inst.extend(o);
                        }
                    }
                }
            } else {
                doc.insert(k, v);
            }
        }
    }
    doc.insert("instances".into(), serde_json::Value::Array(instances));
    serde_json::Value::Object(doc).to_string()
}

/// A chat completions path for `deployment` on the dated API.
pub fn chat_path(deployment: &str) -> String {
    format!("/openai/deployments/{deployment}/chat/completions?api-version=2025-01-01-preview")
}

/// A small chat body; `stream` selects SSE.
pub fn chat_body(stream: bool) -> String {
    serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": stream,
    })
    .to_string()
}

/// Authorization headers with [`CLIENT_KEY`].
pub fn auth() -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {CLIENT_KEY}")),
        ("content-type", "application/json".to_owned()),
    ]
}

/// `api-key: key` and a JSON content type.
pub fn key_headers(key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("api-key", key.to_owned()),
        ("content-type", "application/json".to_owned()),
    ]
}

/// A multipart upload of `content` as a batch input file: (content type, body).
pub fn multipart_file(content: &str) -> (String, String) {
    let boundary = "aoai-lb-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP/1.1 client with keep-alive.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request<K: AsRef<str>, V: AsRef<str>>(
    method: Method,
    url: &str,
    headers: &[(K, V)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(k.as_ref(), v.as_ref());
    }
    b.body(Full::new(body.into())).expect("valid request")
}

/// Sends one request and collects the response.
pub async fn send<K: AsRef<str>, V: AsRef<str>>(
    method: Method,
    url: &str,
    headers: &[(K, V)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    send_with(&client(), method, url, headers, body).await
}

/// [`send`] on a given client (to reuse its connections).
pub async fn send_with<K: AsRef<str>, V: AsRef<str>>(
    client: &TestClient,
    method: Method,
    url: &str,
    headers: &[(K, V)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    let req = request(method, url, headers, body);
    let fut = async {
        let resp = client.request(req).await.expect("response headers");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("response body").to_bytes();
        (parts.status, parts.headers, bytes)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .expect("request finished in time")
}

/// One body chunk and when it arrived, measured from when the request was
/// sent.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub at: Duration,
    pub data: Bytes,
}

/// A response read chunk by chunk.
#[derive(Debug)]
pub struct Streamed {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// When the response headers arrived.
    pub headers_at: Duration,
    pub chunks: Vec<Chunk>,
    /// `Err` text if the body ended with an error (aborted stream).
    pub error: Option<String>,
}

impl Streamed {
    /// All body bytes concatenated.
    pub fn body(&self) -> Bytes {
        let mut v = Vec::new();
        for c in &self.chunks {
            v.extend_from_slice(&c.data);
        }
        Bytes::from(v)
    }

    /// The `data:` payloads of the SSE events, in order.
    pub fn sse_data(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body())
            .split("\n\n")
            .filter_map(|ev| {
                ev.lines()
                    .find_map(|l| l.strip_prefix("data:").map(|d| d.trim().to_owned()))
            })
            .collect()
    }
}

/// Sends one request and reads the body frame by frame, timing each.
pub async fn send_stream<K: AsRef<str>, V: AsRef<str>>(
    method: Method,
    url: &str,
    headers: &[(K, V)],
    body: impl Into<Bytes>,
) -> Streamed {
    let req = request(method, url, headers, body);
    let fut = async {
        let start = Instant::now();
        let resp = client().request(req).await.expect("response headers");
        let headers_at = start.elapsed();
        let (parts, mut body) = resp.into_parts();
        let mut chunks = Vec::new();
        let mut error = None;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        chunks.push(Chunk {
                            at: start.elapsed(),
                            data,
                        });
                    }
                }
                Some(Err(e)) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        Streamed {
            status: parts.status,
            headers: parts.headers,
            headers_at,
            chunks,
            error,
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .expect("stream finished in time")
}

/// GETs `url` with no headers: asserts 200, returns the body as text.
pub async fn get_ok(url: &str) -> String {
    let (s, _, b) = send(Method::GET, url, &[] as &[(&str, &str)], "").await;
    let text = String::from_utf8(b.to_vec()).expect("UTF-8 body");
    assert_eq!(s, StatusCode::OK, "GET {url}: {text}");
    text
}

/// GETs `url` with no headers: asserts 200, returns the body as JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    let text = get_ok(url).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: {e}: {text}"))
}

/// The samples of metric `name` (the series itself, not `name_suffix`)
/// whose line contains every one of `labels` (`key="value"`), in the
/// Prometheus text `text`.
fn samples<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [&'a str],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(move |l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|lab| l.contains(lab))
        })
        .map(|l| {
            let v = l.rsplit(' ').next().unwrap_or_default();
            v.parse()
                .unwrap_or_else(|e| panic!("{e}: not a sample value in {l:?}"))
        })
}

/// The value of the first series of `name` whose labels include every one
/// of `labels` (`key="value"`), or `None` when there is none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    samples(text, name, labels).next()
}

/// The sum over every series of `name` whose labels include all `labels`
/// (0 when there is none).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    samples(text, name, labels).sum()
}

// ---- The real binary ----------------------------------------------------

/// Environment variables the gateway reads; removed from every spawned
/// binary's environment so the test's own environment cannot leak in.
pub const GATEWAY_ENV: &[&str] = &[
    "OPENAI_INSTANCES",
    "OPENAI_CONFIG_PATH",
    "CONFIG_POLL_MS",
    "API_KEY",
    "ALLOW_UNAUTHENTICATED",
    "PORT",
    "HOST",
    "ADMIN_PORT",
    "ADMIN_HOST",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "AOAI_LB_WORKERS",
    "AOAI_LB_HTTP1",
];

/// Which stream a captured line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A running `aoai-lb` process. Killed on drop.
pub struct Binary {
    child: Child,
    lines: Arc<Mutex<Vec<(Stream, String)>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Spawns the real binary with `doc` as `OPENAI_INSTANCES`, `CLIENT_KEY` as
/// `API_KEY`, and free loopback ports for traffic and admin; returns it once
/// it listens, with the traffic address.
pub fn spawn_gateway_binary(doc: &str) -> (Binary, SocketAddr) {
    let (bin, addr, _) = spawn_gateway_binary_with_admin(doc);
    (bin, addr)
}

/// [`spawn_gateway_binary`], returning the admin address too.
pub fn spawn_gateway_binary_with_admin(doc: &str) -> (Binary, SocketAddr, SocketAddr) {
    spawn_gateway_binary_with_env(doc, &[])
}

/// [`spawn_gateway_binary_with_admin`] with more variables in the
/// environment (`AOAI_LB_HTTP1`, `AOAI_LB_WORKERS`, ...).
pub fn spawn_gateway_binary_with_env(
    doc: &str,
    extra: &[(&str, &str)],
) -> (Binary, SocketAddr, SocketAddr) {
    let port = free_port().to_string();
    let admin = free_port().to_string();
    let mut env = vec![
        ("OPENAI_INSTANCES", doc),
        ("API_KEY", CLIENT_KEY),
        ("PORT", port.as_str()),
        ("ADMIN_PORT", admin.as_str()),
        ("HOST", "127.0.0.1"),
    ];
    env.extend_from_slice(extra);
    let bin = spawn_binary(&[], &env);
    let (addr, admin) = bin.wait_listening(Duration::from_secs(20));
    (bin, addr, admin)
}

/// Spawns the real binary with `args` and exactly the gateway variables in
/// `env` (others of [`GATEWAY_ENV`] removed).
pub fn spawn_binary(args: &[&str], env: &[(&str, &str)]) -> Binary {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aoai-lb"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for k in GATEWAY_ENV {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("binary starts");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(reader(out, Stream::Stdout, lines.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(reader(err, Stream::Stderr, lines.clone()));
    }
    Binary {
        child,
        lines,
        readers,
    }
}

fn reader(
    r: impl std::io::Read + Send + 'static,
    which: Stream,
    lines: Arc<Mutex<Vec<(Stream, String)>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push((which, line));
        }
    })
}

impl Binary {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line captured so far, both streams, in arrival order.
    pub fn lines(&self) -> Vec<(Stream, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// Only the text of every line captured so far.
    pub fn all_text(&self) -> Vec<String> {
        self.lines().into_iter().map(|(_, l)| l).collect()
    }

    /// Waits up to `timeout` for a line matching `pred`.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, l)) = self.lines().into_iter().find(|(_, l)| pred(l)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a JSON log line whose `message` equals `message`, and
    /// returns it parsed.
    pub fn wait_for_message(&self, timeout: Duration, message: &str) -> Option<serde_json::Value> {
        let line = self.wait_for_line(timeout, |l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v.get("message").and_then(|m| m.as_str()) == Some(message))
        })?;
        serde_json::from_str(&line).ok()
    }

    /// Waits for the `listening` line and returns the public and admin
    /// addresses it reports.
    pub fn wait_listening(&self, timeout: Duration) -> (SocketAddr, SocketAddr) {
        let v = self
            .wait_for_message(timeout, "listening")
            .unwrap_or_else(|| {
                panic!(
                    "binary never reported listening; output: {:#?}",
                    self.lines()
                )
            });
        let a = v["address"]
            .as_str()
            .expect("address")
            .parse()
            .expect("addr");
        let b = v["admin_address"]
            .as_str()
            .expect("admin_address")
            .parse()
            .expect("addr");
        (a, b)
    }

    /// Waits up to `timeout` for the process to exit; then waits for the
    /// output readers, so [`Binary::lines`] is complete.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    for r in self.readers.drain(..) {
                        let _ = r.join();
                    }
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return None,
            }
        }
    }

    /// Sends a signal (`TERM`, `INT`, ...) with the system `kill` command.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{name} failed");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary to completion (bounded by `timeout`) and returns its exit
/// status and every output line. Panics if it does not exit in time.
pub fn run_binary(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, Vec<(Stream, String)>) {
    let mut b = spawn_binary(args, env);
    let status = b
        .wait_exit(timeout)
        .unwrap_or_else(|| panic!("binary did not exit; output: {:#?}", b.lines()));
    (status, b.lines())
}

// ---- Tests that need the process to themselves ---------------------------

/// Set in the environment of a test binary that [`alone`] re-runs: the name
/// of the one test it runs.
const ALONE_ENV: &str = "AOAI_LB_TEST_ALONE";

/// How long a test run by [`alone`] may take.
const ALONE_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the calling test in a process of its own. Every integration test
/// shares one test binary and tests run in parallel, so a test that reads
/// process-wide state (the metrics recorder's exact counts, open
/// descriptors, RSS, threads) would see the other tests' requests and
/// sockets in its figures.
///
/// `module` is the caller's `module_path!()`, `test` its function name.
/// In the test runner this runs the binary again with that test only and
/// returns `false` (the caller returns at once) once the other process
/// has run exactly that test and it passed; its output is printed here.
/// In that other process it returns `true`: the caller does the work.
pub fn alone(module: &str, test: &str) -> bool {
    // `it::proxy_metrics` -> `proxy_metrics::<test>`, the name libtest uses.
    let module = module.split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::{test}");
    if std::env::var(ALONE_ENV).is_ok_and(|v| v == name) {
        return true;
    }
    let mut child = Command::new(std::env::current_exe().expect("test binary path"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE_ENV, &name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the test binary again");
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("stdout")));
    let err = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + ALONE_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the test process") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    print!("{out}");
    eprint!("{err}");
    let status = status.unwrap_or_else(|| panic!("{name} did not finish in {ALONE_TIMEOUT:?}"));
    assert!(
        status.success(),
        "{name} failed in its own process ({status})"
    );
    assert!(
        out.contains("test result: ok. 1 passed;"),
        "the process for {name} did not run exactly that test"
    );
    false
}
