//! `aoai-bench`: the benchmark's own client. `streams` opens many concurrent
//! chat-completion SSE streams against one URL, timestamps every event as it
//! arrives, and prints one JSON object of statistics on stdout. `ready` polls
//! a server until it answers and prints how long that took.
//!
//! Each stream gets its own HTTP/1.1 connection, as a browser or SDK client
//! would, so N streams mean N open client connections through the proxy.
//! Streams start spread evenly over `--ramp-ms` so that the listen backlog is
//! not flooded and the time to first byte measures the proxy, not a connect
//! storm. The whole run is bounded by `--timeout-s`.

mod ready;
mod sse;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// How the client presents its key.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Auth {
    /// `api-key: <key>`, as Azure SDKs send it.
    ApiKey,
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// No credential (for a proxy that injects its own).
    None,
}

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "aoai-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Tokio worker threads; 0 means one per available CPU.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open concurrent SSE streams and print statistics as JSON.
    Streams(Args),
    /// Wait until a server answers, and print the time it took as JSON.
    Ready(ready::Args),
}

/// Options of `streams`. Every default is chosen for the benchmark's
/// streaming case: 1,000 streams ramped over one second.
#[derive(Debug, clap::Args)]
struct Args {
    /// Full URL of the streaming endpoint, `http://127.0.0.1:PORT/path?query`.
    /// Only plain HTTP is supported.
    #[arg(long)]
    url: String,
    /// Client credential.
    #[arg(long, default_value = "sim-key")]
    key: String,
    /// How the credential is sent.
    #[arg(long, value_enum, default_value = "api-key")]
    auth: Auth,
    /// Number of streams, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Stream starts are spread evenly over this many milliseconds.
    #[arg(long, default_value_t = 1000)]
    ramp_ms: u64,
    /// Expected gap between events, for the deviation statistics.
    #[arg(long, default_value_t = 20.0)]
    expected_gap_ms: f64,
    /// Gaps left out of the deviation statistics at the start of each stream
    /// (events the upstream sends back to back, such as a filter-results
    /// preamble).
    #[arg(long, default_value_t = 0)]
    skip_first_gaps: usize,
    /// Gaps left out at the end of each stream (finish chunk, `[DONE]`).
    #[arg(long, default_value_t = 0)]
    skip_last_gaps: usize,
    /// Bound on the whole run; unfinished streams count as timed out.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Once every stream is open at the same time, wait this long and then
    /// close them all (for memory-per-open-stream runs with long streams).
    #[arg(long)]
    close_after_open_ms: Option<u64>,
    /// File written (with the open count) when every stream is open at once,
    /// so that a driver script can sample the proxy's memory at that moment.
    #[arg(long)]
    open_marker: Option<PathBuf>,
    /// Request body; the default asks for a streamed chat completion.
    #[arg(
        long,
        default_value = r#"{"messages":[{"role":"user","content":"Say hello"}],"stream":true}"#
    )]
    body: String,
}

/// How one stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The body ended after `[DONE]` (or ended cleanly).
    Completed,
    /// Closed by the client after all streams were open.
    ClosedEarly,
    ConnectError,
    Handshake,
    Status(u16),
    BodyError,
    Timeout,
}

/// Everything recorded for one stream. Times are microseconds from the
/// moment the request was handed to the connection.
#[derive(Debug)]
struct StreamResult {
    outcome: Outcome,
    connect_us: Option<u64>,
    headers_us: Option<u64>,
    ttfb_us: Option<u64>,
    events: u32,
    done: bool,
    gaps_us: Vec<u64>,
    /// Counted among the open streams (a 200 head arrived).
    opened: bool,
}

impl StreamResult {
    fn failed(outcome: Outcome) -> Self {
        Self {
            outcome,
            connect_us: None,
            headers_us: None,
            ttfb_us: None,
            events: 0,
            done: false,
            gaps_us: Vec::new(),
            opened: false,
        }
    }
}

/// Shared between streams: how many are open right now, and the signal to
/// close early.
struct Shared {
    open: AtomicUsize,
    /// Streams that ended before they were open (refused, cut before the
    /// head, timed out): they will never be open, so "every stream open"
    /// means open + these.
    failed_early: AtomicUsize,
    max_open: AtomicUsize,
    all_open: watch::Sender<bool>,
    close: watch::Receiver<bool>,
}

pub(crate) struct Target {
    pub(crate) authority: String,
    pub(crate) host_header: String,
    pub(crate) path_and_query: String,
}

/// Splits a plain-HTTP URL into what a raw connection needs.
pub(crate) fn parse_target(url: &str) -> Result<Target> {
    let uri: Uri = url.parse().context("--url is not a valid URL")?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be plain http://");
    }
    let authority = uri.authority().context("--url has no host")?;
    let port = authority.port_u16().unwrap_or(80);
    Ok(Target {
        authority: format!("{}:{port}", authority.host()),
        host_header: authority.to_string(),
        path_and_query: uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), ToString::to_string),
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn one_stream(
    target: Arc<Target>,
    args: Arc<Args>,
    body: Bytes,
    shared: Arc<Shared>,
) -> StreamResult {
    let t0 = Instant::now();
    let tcp = match TcpStream::connect(&target.authority).await {
        Ok(s) => s,
        Err(_) => return StreamResult::failed(Outcome::ConnectError),
    };
    let _ = tcp.set_nodelay(true);
    let connect_us = micros(t0.elapsed());
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(pair) => pair,
        Err(_) => return StreamResult::failed(Outcome::Handshake),
    };
    // The connection task ends when the response body is dropped or fails.
    tokio::spawn(conn);

    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(target.path_and_query.as_str())
        .header(header::HOST, target.host_header.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "text/event-stream");
    builder = match args.auth {
        Auth::ApiKey => builder.header("api-key", args.key.as_str()),
        Auth::Bearer => builder.header(header::AUTHORIZATION, format!("Bearer {}", args.key)),
        Auth::None => builder,
    };
    let req = match builder.body(Full::new(body)) {
        Ok(r) => r,
        Err(_) => return StreamResult::failed(Outcome::Handshake),
    };

    let start = Instant::now();
    let mut res = StreamResult::failed(Outcome::Completed);
    res.connect_us = Some(connect_us);
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(_) => {
            res.outcome = Outcome::BodyError;
            return res;
        }
    };
    res.headers_us = Some(micros(start.elapsed()));
    let status = resp.status().as_u16();
    if status != 200 {
        res.outcome = Outcome::Status(status);
        return res;
    }

    let now_open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
    res.opened = true;
    shared.max_open.fetch_max(now_open, Ordering::SeqCst);
    if now_open + shared.failed_early.load(Ordering::SeqCst) >= args.streams {
        shared.all_open.send_replace(true);
    }

    let mut body = resp.into_body();
    let mut framer = sse::Framer::new();
    let mut last_event: Option<Instant> = None;
    let mut close = shared.close.clone();
    // Resolves only on an explicit close; a dropped sender means "never".
    let mut close_signal = std::pin::pin!(async move {
        if close.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    });
    loop {
        let frame = tokio::select! {
            f = body.frame() => f,
            () = &mut close_signal => {
                res.outcome = Outcome::ClosedEarly;
                break;
            }
        };
        match frame {
            None => break,
            Some(Err(_)) => {
                res.outcome = Outcome::BodyError;
                break;
            }
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let now = Instant::now();
                if res.ttfb_us.is_none() && !data.is_empty() {
                    res.ttfb_us = Some(micros(now - start));
                }
                framer.feed(data, |ev| {
                    res.events += 1;
                    if ev == sse::Event::Done {
                        res.done = true;
                    }
                    if let Some(prev) = last_event {
                        res.gaps_us.push(micros(now - prev));
                    }
                    last_event = Some(now);
                });
            }
        }
    }
    shared.open.fetch_sub(1, Ordering::SeqCst);
    res
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cli.threads > 0 {
        rt.worker_threads(cli.threads);
    }
    let rt = rt.build().context("cannot start the async runtime")?;
    let out = match cli.command {
        Command::Streams(args) => rt.block_on(run(args))?,
        Command::Ready(args) => rt.block_on(ready::run(args))?,
    };
    println!("{out}");
    Ok(())
}

async fn run(args: Args) -> Result<serde_json::Value> {
    if args.streams == 0 {
        bail!("--streams must be at least 1");
    }
    let target = Arc::new(parse_target(&args.url)?);
    let args = Arc::new(args);
    let body = Bytes::from(args.body.clone());
    let (all_open_tx, mut all_open_rx) = watch::channel(false);
    let (close_tx, close_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        open: AtomicUsize::new(0),
        failed_early: AtomicUsize::new(0),
        max_open: AtomicUsize::new(0),
        all_open: all_open_tx,
        close: close_rx,
    });

    let begin = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let n = args.streams;
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let offset = Duration::from_micros(args.ramp_ms * 1000 * i as u64 / n as u64);
        let (target, args, body, shared) =
            (target.clone(), args.clone(), body.clone(), shared.clone());
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let r =
                tokio::time::timeout_at(deadline, one_stream(target, args, body, shared.clone()))
                    .await
                    .unwrap_or_else(|_| StreamResult::failed(Outcome::Timeout));
            if !r.opened {
                // Without this, one refused stream would keep the others
                // open until the timeout.
                let failed = shared.failed_early.fetch_add(1, Ordering::SeqCst) + 1;
                if shared.open.load(Ordering::SeqCst) + failed >= n {
                    shared.all_open.send_replace(true);
                }
            }
            r
        }));
    }

    // When every stream is open at once: leave a marker, then optionally close.
    let watcher = {
        let args = args.clone();
        tokio::spawn(async move {
            if all_open_rx.wait_for(|v| *v).await.is_err() {
                return None;
            }
            let at = begin.elapsed();
            if let Some(path) = &args.open_marker {
                let _ = tokio::fs::write(path, format!("{n}\n")).await;
            }
            if let Some(ms) = args.close_after_open_ms {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                close_tx.send_replace(true);
            }
            Some(at)
        })
    };

    let mut results = Vec::with_capacity(n);
    for h in handles {
        match h.await {
            Ok(r) => results.push(r),
            Err(_) => results.push(StreamResult::failed(Outcome::Timeout)),
        }
    }
    let wall = begin.elapsed();
    watcher.abort();
    let all_open_at = watcher.await.ok().flatten();
    Ok(report(&args, &results, &shared, wall, all_open_at))
}

fn report(
    args: &Args,
    results: &[StreamResult],
    shared: &Shared,
    wall: Duration,
    all_open_at: Option<Duration>,
) -> serde_json::Value {
    const PCT: &[f64] = &[50.0, 90.0, 99.0, 99.9];
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let (mut connect, mut headers, mut ttfb, mut events) = (vec![], vec![], vec![], vec![]);
    let (mut gaps, mut dev) = (vec![], vec![]);
    let expected = args.expected_gap_ms * 1000.0;
    let mut done = 0usize;
    for r in results {
        let key = match r.outcome {
            Outcome::Completed => "completed".to_string(),
            Outcome::ClosedEarly => "closed_early".to_string(),
            Outcome::ConnectError => "connect_error".to_string(),
            Outcome::Handshake => "handshake_error".to_string(),
            Outcome::Status(s) => format!("status_{s}"),
            Outcome::BodyError => "body_error".to_string(),
            Outcome::Timeout => "timeout".to_string(),
        };
        *counts.entry(key).or_default() += 1;
        connect.extend(r.connect_us);
        headers.extend(r.headers_us);
        ttfb.extend(r.ttfb_us);
        if matches!(r.outcome, Outcome::Completed) {
            events.push(u64::from(r.events));
            done += usize::from(r.done);
            let end = r.gaps_us.len().saturating_sub(args.skip_last_gaps);
            if let Some(kept) = r.gaps_us.get(args.skip_first_gaps.min(end)..end) {
                for &g in kept {
                    gaps.push(g);
                    dev.push((g as f64 - expected).abs() as u64);
                }
            }
        }
    }
    json!({
        "streams": args.streams,
        "outcomes": counts,
        "done_seen": done,
        "max_open": shared.max_open.load(Ordering::SeqCst),
        "all_open_at_ms": all_open_at.map(|d| d.as_millis() as u64),
        "wall_ms": wall.as_millis() as u64,
        "expected_gap_us": expected,
        "connect_us": stats::summary(&mut connect, PCT),
        "headers_us": stats::summary(&mut headers, PCT),
        "ttfb_us": stats::summary(&mut ttfb, PCT),
        "events_per_stream": stats::summary(&mut events, &[50.0]),
        "gap_us": stats::summary(&mut gaps, &[1.0, 50.0, 99.0, 99.9]),
        "gap_dev_us": stats::summary(&mut dev, PCT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_keeps_path_and_query() {
        let t = parse_target("http://127.0.0.1:8080/openai/x?api-version=1").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.host_header, "127.0.0.1:8080");
        assert_eq!(t.path_and_query, "/openai/x?api-version=1");
    }

    #[test]
    fn rejects_https_targets() {
        assert!(parse_target("https://127.0.0.1/").is_err());
    }

    #[test]
    fn target_without_port_uses_80() {
        let t = parse_target("http://127.0.0.1/").unwrap();
        assert_eq!(t.authority, "127.0.0.1:80");
    }
}
