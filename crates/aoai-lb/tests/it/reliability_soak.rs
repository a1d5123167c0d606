//! The soak driver, run by `scripts/soak.sh` against the release binaries
//! (it is `#[ignore]`d in the normal test run): a long mixed load of
//! streaming and non-streaming chats through a running gateway while faults
//! are injected into the simulator at run time. It samples the gateway's
//! RSS and open descriptors from /proc after a warm-up and at the end, each
//! time with the load's connections closed, and prints `FIGURE soak ...`.
//!
//! Environment (set by the script): `SOAK_URL` (gateway base URL),
//! `SOAK_KEY` (client key), `SOAK_PID` (gateway pid), `SOAK_SIMS`
//! (comma-separated simulator base URLs with admin routes on),
//! `SOAK_REQUESTS` (default 200000), `SOAK_CONCURRENCY` (default 64),
//! `SOAK_SETTLE_MS` (pause before each sample, default 4000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type C = Client<HttpConnector, Full<Bytes>>;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn num(name: &str, default: usize) -> usize {
    env(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// (RSS in KiB, open descriptors, of which sockets) of `pid`.
fn sample(pid: &str) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway alive");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let sockets = links.iter().filter(|l| l.starts_with("socket:")).count();
    (rss, links.len(), sockets)
}

/// Faults injected round-robin into the simulators during the run.
const FAULTS: [&str; 6] = [
    r#"{"kind":"close_mid_stream","count":5,"after_chunks":2}"#,
    r#"{"kind":"reset_before_response","count":5}"#,
    r#"{"kind":"fail","count":3,"status":429,"retry_after_ms":200}"#,
    r#"{"kind":"fail","count":5,"status":503}"#,
    r#"{"kind":"hang","count":2,"ms":3000}"#,
    r#"{"kind":"drip","count":3,"bytes":64,"interval_ms":5}"#,
];

#[derive(Default)]
struct Counts {
    by_outcome: std::sync::Mutex<BTreeMap<String, usize>>,
}

impl Counts {
    fn add(&self, k: String) {
        *self.by_outcome.lock().unwrap().entry(k).or_default() += 1;
    }
}

async fn one(client: &C, url: &str, key: &str, stream: bool) -> String {
    let body = if stream {
        r#"{"messages":[{"role":"user","content":"soak"}],"max_tokens":16,"stream":true}"#
    } else {
        r#"{"messages":[{"role":"user","content":"soak"}],"max_tokens":16}"#
    };
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("api-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let kind = if stream { "stream" } else { "plain" };
    let r = tokio::time::timeout(Duration::from_secs(30), async {
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(_) => return "transport_error".to_owned(),
        };
        let status = resp.status();
        match resp.into_body().collect().await {
            Ok(_) if status == StatusCode::OK => "ok".to_owned(),
            Ok(_) => format!("status_{}", status.as_u16()),
            Err(_) => format!("aborted_after_{}", status.as_u16()),
        }
    })
    .await
    .unwrap_or_else(|_| "timeout".to_owned());
    format!("{kind}_{r}")
}

async fn load(
    url: &str,
    key: &str,
    requests: usize,
    concurrency: usize,
    sims: &[String],
    counts: &Arc<Counts>,
) {
    let client: C = Client::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (client, url, key, next, counts, sims) = (
            client.clone(),
            url.to_owned(),
            key.to_owned(),
            next.clone(),
            counts.clone(),
            sims.to_vec(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                // Every 2,000 requests, one worker injects the next fault.
                if w == 0 && i % 2_000 < concurrency && !sims.is_empty() {
                    let n = i / 2_000;
                    let sim = &sims[n % sims.len()];
                    let req = Request::post(format!("{sim}/_sim/faults"))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(
                            FAULTS[n % FAULTS.len()].as_bytes(),
                        )))
                        .unwrap();
                    let _ = client.request(req).await;
                }
                counts.add(one(&client, &url, &key, i % 2 == 0).await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long soak; run scripts/soak.sh"]
async fn soak_keeps_memory_and_descriptors_flat_under_faults() {
    let base = env("SOAK_URL").expect("SOAK_URL (run scripts/soak.sh)");
    let key = env("SOAK_KEY").expect("SOAK_KEY");
    let pid = env("SOAK_PID").expect("SOAK_PID");
    let sims: Vec<String> = env("SOAK_SIMS")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let requests = num("SOAK_REQUESTS", 200_000);
    let concurrency = num("SOAK_CONCURRENCY", 64);
    let warmup = (requests / 10).max(1_000);
    let url = format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
    let counts = Arc::new(Counts::default());

    let started = Instant::now();
    load(&url, &key, warmup, concurrency, &[], &counts).await;
    // Settle: the load's connections are closed and the gateway's idle
    // pooled upstream connections expire (the script sets a short pool
    // idle timeout), so both samples count only what the gateway keeps.
    let settle = Duration::from_millis(num("SOAK_SETTLE_MS", 4_000) as u64);
    tokio::time::sleep(settle).await;
    let (rss0, fds0, sock0) = sample(&pid);
    println!("soak: warm-up of {warmup} done; rss={rss0} KiB fds={fds0} sockets={sock0}");

    let main_start = Instant::now();
    load(&url, &key, requests, concurrency, &sims, &counts).await;
    let main_elapsed = main_start.elapsed();
    tokio::time::sleep(settle).await;
    let (rss1, fds1, sock1) = sample(&pid);

    let by = counts.by_outcome.lock().unwrap().clone();
    let total: usize = by.values().sum();
    let ok: usize = by
        .iter()
        .filter(|(k, _)| k.ends_with("_ok"))
        .map(|(_, v)| v)
        .sum();
    println!(
        "FIGURE soak requests={requests} warmup={warmup} total_with_warmup={total} ok={ok} \
         rss_kib_before={rss0} rss_kib_after={rss1} fds_before={fds0} fds_after={fds1} \
         sockets_before={sock0} sockets_after={sock1} \
         req_per_s={:.0} elapsed_s={:.1} outcomes={by:?}",
        requests as f64 / main_elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(total, requests + warmup);
    // Growth beyond noise: more than 20 % plus 8 MiB over the warm-up level.
    assert!(
        rss1 <= rss0 + rss0 / 5 + 8 * 1024,
        "RSS grew {rss0} -> {rss1} KiB"
    );
    // With idle pooled connections expired, nothing may be left behind.
    assert!(fds1 <= fds0 + 2, "descriptors grew {fds0} -> {fds1}");
    // Faults cost some requests (cut streams, all-failing moments), but the
    // overwhelming majority succeed.
    assert!(
        ok * 100 >= total * 97,
        "only {ok} of {total} succeeded: {by:?}"
    );
}
