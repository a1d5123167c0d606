//! Instance loss under load: one of three instances dies in the middle of
//! thousands of concurrent non-streaming requests. Every request whose
//! response had not started must be answered by another instance.
//!
//! Prints `FIGURE instance_loss lost=L total=T ...` for RELIABILITY.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

const TOTAL: usize = 5_000;
const CONCURRENCY: usize = 64;
/// The instance is stopped once this many requests have completed.
const STOP_AFTER: usize = 1_500;

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    /// Non-200 status, or no response headers at all: the request was lost.
    lost: AtomicUsize,
    /// 200 headers, then the body failed: the response had started, so the
    /// gateway rightly could not retry it.
    started_then_cut: AtomicUsize,
    done: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loses_no_request_when_an_instance_dies_under_load() {
    let sims = start_sims(
        (0..3)
            .map(|i| {
                aoai_sim::InstanceConfig::new(format!("sim{i}"))
                    .latency(8, 0)
                    .journal_capacity(TOTAL * 2)
            })
            .collect(),
    )
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let body = Bytes::from(chat_body(false));
    let client = client();
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let stopped_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let started = Instant::now();

    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        let (tally, next, sims, stopped_at) = (
            tally.clone(),
            next.clone(),
            sims.clone(),
            stopped_at.clone(),
        );
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < TOTAL {
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(&url)
                    .header("authorization", format!("Bearer {CLIENT_KEY}"))
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .unwrap();
                let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    match client.request(req).await {
                        Err(_) => Err(false),
                        Ok(resp) if resp.status() != StatusCode::OK => Err(false),
                        Ok(resp) => match resp.into_body().collect().await {
                            Ok(b) => serde_json::from_slice::<serde_json::Value>(&b.to_bytes())
                                .map(|_| ())
                                .map_err(|_| true),
                            Err(_) => Err(true),
                        },
                    }
                })
                .await
                .unwrap_or(Err(false));
                match outcome {
                    Ok(()) => tally.ok.fetch_add(1, Ordering::Relaxed),
                    Err(true) => tally.started_then_cut.fetch_add(1, Ordering::Relaxed),
                    Err(false) => tally.lost.fetch_add(1, Ordering::Relaxed),
                };
                if tally.done.fetch_add(1, Ordering::Relaxed) + 1 == STOP_AFTER {
                    sims[1].stop();
                    *stopped_at.lock().unwrap() = Some(Instant::now());
                }
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("load finished in time")
            .unwrap();
    }
    let elapsed = started.elapsed();
    let stop_time = stopped_at
        .lock()
        .unwrap()
        .expect("the instance was stopped");

    // Requests that the dead instance had received but never answered:
    // each of them had to be replayed elsewhere.
    let cut_at_dead: usize = sims[1]
        .journal()
        .iter()
        .filter(|e| e.status == 0 || e.outcome != aoai_sim::Outcome::Completed)
        .count();
    let per_instance: Vec<usize> = sims.iter().map(|s| s.request_count()).collect();
    let ok = tally.ok.load(Ordering::Relaxed);
    let lost = tally.lost.load(Ordering::Relaxed);
    let cut = tally.started_then_cut.load(Ordering::Relaxed);
    println!(
        "FIGURE instance_loss lost={lost} total={TOTAL} ok={ok} started_then_cut={cut} \
         in_flight_at_dead_instance={cut_at_dead} per_instance={per_instance:?} \
         concurrency={CONCURRENCY} stop_after={STOP_AFTER} \
         stopped_at_ms={} elapsed_ms={}",
        (stop_time - started).as_millis(),
        elapsed.as_millis()
    );
    assert_eq!(ok + lost + cut, TOTAL);
    assert_eq!(lost, 0, "requests lost although no response had started");
    // The instance really was serving before it died, and traffic went on.
    assert!(per_instance[1] > 100, "{per_instance:?}");
    assert!(per_instance[0] + per_instance[2] > TOTAL - per_instance[1]);
    gw.shutdown().await;
}
