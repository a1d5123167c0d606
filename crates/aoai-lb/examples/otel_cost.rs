//! What tracing costs: the same closed-loop load through a gateway with
//! tracing off and through one with tracing on (every request sampled,
//! exported over OTLP gRPC to a loopback sink that discards), in one
//! process and one run, alternating which goes first in each round.
//!
//! ```text
//! cargo run --release -p aoai-lb --example otel_cost -- [rounds] [seconds] [connections]
//! ```
//!
//! Prints, per round and as medians: requests per second and process CPU
//! time per request (gateway, simulator, load client and sink together; they
//! are the same in both modes except the sink, which only sees traffic with
//! tracing on). The difference between the modes is the price of tracing.
//! Everything listens on 127.0.0.1; each run is bounded by `seconds`.
// A benchmark harness: a failed set-up ends it with a message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aoai_lb::config::Config;
use aoai_lb::otel::{Settings, Tracing};
use aoai_lb::secret::Secret;
use aoai_lb::server::{ServeOptions, ServerHandle};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

const KEY: &str = "bench-client-key";

/// utime + stime of this process, from /proc (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// An OTLP sink: reads every export and answers success, for gRPC and
/// HTTP alike.
async fn sink() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let grpc = req
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                    let _ = req.into_body().collect().await;
                    let body: BoxBody<Bytes, Infallible> = if grpc {
                        let mut trailers = HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        StreamBody::new(futures_util::stream::iter([
                            Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                            Ok(Frame::trailers(trailers)),
                        ]))
                        .boxed()
                    } else {
                        Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
                    };
                    let ctype = if grpc {
                        "application/grpc"
                    } else {
                        "application/x-protobuf"
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", ctype)
                            .body(body)
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

async fn gateway(doc: &str, tracing: Option<Arc<Tracing>>) -> ServerHandle {
    let config = Arc::new(Config::from_json(doc).unwrap());
    let mut opts = ServeOptions::local(Some(Secret::new(KEY)));
    opts.tracing = tracing;
    aoai_lb::server::spawn(config, opts).await.unwrap()
}

/// Closed loop: `connections` tasks each send chats back to back for
/// `secs`. Returns (requests, wall time, CPU time).
async fn load(url: &str, connections: usize, secs: u64) -> (u64, Duration, Duration) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let done = Arc::new(AtomicU64::new(0));
    let body = Bytes::from(
        serde_json::json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":16})
            .to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(secs);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, done, body, url) = (
                client.clone(),
                Arc::clone(&done),
                body.clone(),
                url.to_owned(),
            );
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let req = Request::post(&url)
                        .header("api-key", KEY)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let resp = client.request(req).await.unwrap();
                    assert!(resp.status().is_success(), "{}", resp.status());
                    let _ = resp.into_body().collect().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (
        done.load(Ordering::Relaxed),
        t0.elapsed(),
        cpu_time() - cpu0,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: rounds seconds connections"))
        .collect();
    let rounds = args.first().copied().unwrap_or(5);
    let secs = args.get(1).copied().unwrap_or(5);
    let connections = usize::try_from(args.get(2).copied().unwrap_or(16)).unwrap();

    let sims = aoai_sim::start(vec![aoai_sim::InstanceConfig::new("sim0")])
        .await
        .unwrap();
    let doc = serde_json::json!({"instances":[{
        "name":"sim0","url":sims[0].url(),"api_key":sims[0].config().api_key}]})
    .to_string();
    let sink = sink().await;
    let vars = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{sink}")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
    ];
    let settings =
        Settings::from_env(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .unwrap()
            .unwrap();
    let tracing = Tracing::start(&settings).unwrap();
    let off = gateway(&doc, None).await;
    let on = gateway(&doc, Some(Arc::clone(&tracing))).await;
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    let url_off = format!("http://{}{path}", off.local_addr());
    let url_on = format!("http://{}{path}", on.local_addr());

    // Warm-up: connections, pools, allocator.
    load(&url_off, connections, 1).await;
    load(&url_on, connections, 1).await;

    println!(
        "{rounds} rounds x {secs} s, {connections} connections, non-streaming chat, one simulated instance"
    );
    println!("round  mode  req/s    CPU us/req");
    let (mut rps, mut cpu) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut this = [0.0; 2];
        for mode in order {
            let url = if mode == 0 { &url_off } else { &url_on };
            let (n, wall, used) = load(url, connections, secs).await;
            let per = used.as_secs_f64() * 1e6 / n as f64;
            let rate = n as f64 / wall.as_secs_f64();
            println!(
                "{r:>5}  {:<4}  {rate:>7.0}  {per:>8.1}",
                if mode == 0 { "off" } else { "on" }
            );
            rps[mode].push(rate);
            cpu[mode].push(per);
            this[mode] = per;
        }
        ratios.push(this[1] / this[0]);
    }
    let (cpu_off, cpu_on) = (median(cpu[0].clone()), median(cpu[1].clone()));
    println!(
        "median  off: {:.0} req/s, {cpu_off:.1} us CPU/req | on: {:.0} req/s, {cpu_on:.1} us CPU/req | on/off CPU ratio (median of per-round ratios) {:.3}",
        median(rps[0].clone()),
        median(rps[1].clone()),
        median(ratios)
    );
    let t = Arc::clone(&tracing);
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .unwrap()
        .unwrap();
    off.shutdown();
    on.shutdown();
}
