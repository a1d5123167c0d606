//! Fault injection with figures: 429 storms (one instance, then all),
//! hung backends, stalled and reset streams, and client disconnects.
//!
//! Each test prints a `FIGURE <name> key=value ...` line for RELIABILITY.md
//! and asserts the bound the gateway promises. The tests take a shared lock
//! so their timings are not distorted by each other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aoai_sim::{Fault, SimHandle};
use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

/// Serialises the tests of this file: they measure time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const COOLDOWN_MS: u64 = 1_000;
/// Concurrent clients in the 429 storms.
const WORKERS: usize = 16;

fn throttle(ms: u64) -> Fault {
    Fault::Fail {
        count: None,
        status: 429,
        body: None,
        retry_after_ms: Some(ms),
    }
}

fn served_by(h: &HeaderMap) -> String {
    h.get("x-aoai-sim-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

fn chat_request(url: &str, stream: bool) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body(stream))))
        .unwrap()
}

/// What a closed-loop load of `workers` clients saw over `duration`.
#[derive(Debug, Default)]
struct Storm {
    sent: usize,
    ok: usize,
    throttled: usize,
    throttled_with_retry_after_ms: usize,
    other: usize,
    /// Responses served by each instance name (from the sim's header).
    served: std::collections::BTreeMap<String, usize>,
}

/// Closed-loop load: each worker sends a request, waits `pause`, repeats.
async fn storm(url: &str, workers: usize, duration: Duration, pause: Duration) -> Storm {
    let client = client();
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(std::sync::Mutex::new(Storm::default()));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, stop, results) = (
            client.clone(),
            url.to_owned(),
            stop.clone(),
            results.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let resp = tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    client.request(chat_request(&url, false)),
                )
                .await
                .expect("answered in time")
                .expect("response headers");
                let (parts, body) = resp.into_parts();
                let _ = body.collect().await;
                {
                    let mut r = results.lock().unwrap();
                    r.sent += 1;
                    match parts.status {
                        StatusCode::OK => {
                            r.ok += 1;
                            *r.served.entry(served_by(&parts.headers)).or_default() += 1;
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            r.throttled += 1;
                            if parts.headers.contains_key("retry-after-ms") {
                                r.throttled_with_retry_after_ms += 1;
                            }
                        }
                        _ => r.other += 1,
                    }
                }
                tokio::time::sleep(pause).await;
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

/// Arrival times (ms since the first), in ascending order, of the requests an
/// instance received. The journal is in arrival-sequence order, but two
/// requests arriving together can take their timestamps in the other order,
/// so the times are sorted rather than assumed sorted.
fn arrivals(sim: &SimHandle) -> Vec<u64> {
    let j = sim.journal();
    let first = j.iter().map(|e| e.received_at_ms).min().unwrap_or(0);
    let mut times: Vec<u64> = j.iter().map(|e| e.received_at_ms - first).collect();
    times.sort_unstable();
    times
}

/// The largest number of requests an instance received within any window
/// of `window_ms` (sliding over its arrivals).
fn max_in_window(arrivals: &[u64], window_ms: u64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..arrivals.len() {
        while arrivals[hi] - arrivals[lo] >= window_ms {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_traffic_off_a_throttled_instance_at_once_without_a_hot_loop() {
    let _serial = SERIAL.lock().await;
    let sims = sims(3).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    sims[0].inject(throttle(COOLDOWN_MS));

    let run = Duration::from_millis(3_200);
    let s = storm(&url, WORKERS, run, Duration::from_millis(2)).await;
    let hits = arrivals(&sims[0]);
    let windows = run.as_millis() as u64 / COOLDOWN_MS + 1;
    println!(
        "FIGURE storm_one sent={} ok={} throttled_to_client={} other={} \
         throttled_instance_hits={} allowed_max={} max_hits_per_cooldown={} served={:?} hit_ms={:?}",
        s.sent,
        s.ok,
        s.throttled,
        s.other,
        hits.len(),
        windows,
        max_in_window(&hits, COOLDOWN_MS),
        s.served,
        hits
    );
    // Traffic moved at once: every client request succeeded elsewhere.
    assert_eq!(s.ok, s.sent, "{s:?}");
    assert!(s.sent > 200, "{s:?}");
    assert!(!s.served.contains_key("sim0"), "{s:?}");
    // No hot loop: the throttled instance is contacted only around the
    // end of each cooldown, never once per client request. (Exactly one
    // probe per cooldown is `sends_a_single_probe_when_a_cooldown_ends`.)
    assert!(hits.len() as u64 <= windows * WORKERS as u64, "{hits:?}");
    assert!(hits.len() * 50 < s.sent, "{hits:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_429_with_retry_after_ms_when_all_are_throttled_without_a_hot_loop() {
    let _serial = SERIAL.lock().await;
    let sims = sims(3).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    for s in &sims {
        s.inject(throttle(COOLDOWN_MS));
    }

    let run = Duration::from_millis(3_200);
    let s = storm(&url, WORKERS, run, Duration::from_millis(5)).await;
    let hits: Vec<Vec<u64>> = sims.iter().map(arrivals).collect();
    let total_hits: usize = hits.iter().map(Vec::len).sum();
    let windows = run.as_millis() as u64 / COOLDOWN_MS + 1;
    let worst = hits
        .iter()
        .map(|h| max_in_window(h, COOLDOWN_MS))
        .max()
        .unwrap();
    println!(
        "FIGURE storm_all sent={} throttled_to_client={} with_retry_after_ms={} ok={} other={} \
         backend_hits={} per_instance={:?} allowed_per_instance={} max_hits_per_cooldown={}",
        s.sent,
        s.throttled,
        s.throttled_with_retry_after_ms,
        s.ok,
        s.other,
        total_hits,
        hits.iter().map(Vec::len).collect::<Vec<_>>(),
        windows,
        worst
    );
    assert_eq!(s.throttled, s.sent, "{s:?}");
    assert_eq!(s.throttled_with_retry_after_ms, s.sent, "{s:?}");
    assert!(s.sent > 500, "clients were answered at once: {s:?}");
    // No hot loop: backend hits stay near the number of cooldowns, far
    // below the number of client requests. The ratio is kept at 10: on a
    // loaded host fewer client requests are sent in the same time while the
    // probes per cooldown stay the same (seen: 28 hits for 1,253 requests).
    for h in &hits {
        assert!(h.len() as u64 <= windows * WORKERS as u64, "{hits:?}");
    }
    assert!(total_hits * 10 < s.sent, "{hits:?} for {} requests", s.sent);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_a_single_probe_when_a_cooldown_ends() {
    let _serial = SERIAL.lock().await;
    let sims = sims(2).await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    sims[0].inject(throttle(COOLDOWN_MS));
    // Sequential requests until the throttled instance has answered one
    // 429: it is now cooling, and no concurrent request raced the first.
    for _ in 0..50 {
        if sims[0].request_count() > 0 {
            break;
        }
        let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
        assert_eq!(s, StatusCode::OK);
    }
    assert_eq!(sims[0].request_count(), 1);
    let run = Duration::from_millis(2_500);
    let s = storm(&url, WORKERS, run, Duration::from_millis(2)).await;
    let hits = arrivals(&sims[0]);
    println!("FIGURE probe_per_cooldown hits_ms={hits:?} sent={}", s.sent);
    assert_eq!(s.ok, s.sent, "{s:?}");
    // The simulator stamps arrivals with the wall clock and the gateway
    // times cooldowns on its own millisecond clock: allow 2 ms between them.
    assert_eq!(max_in_window(&hits, COOLDOWN_MS - 2), 1, "{hits:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_from_a_hung_backend_after_the_response_headers_timeout() {
    let _serial = SERIAL.lock().await;
    const HEADERS_MS: u64 = 250;
    let sims = sims(2).await;
    let doc = config_with(
        &sims,
        serde_json::json!({
            "timeouts": {"response_headers_ms": HEADERS_MS},
            "instances": [{"priority": 1}, {"priority": 2}],
        }),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    sims[0].inject(Fault::Hang {
        count: Some(1),
        ms: None,
    });
    let started = Instant::now();
    let (s, h, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    let took = started.elapsed();
    println!(
        "FIGURE hang_failover failover_ms={} response_headers_timeout_ms={HEADERS_MS} served_by={}",
        took.as_millis(),
        served_by(&h)
    );
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1");
    assert!(took >= Duration::from_millis(HEADERS_MS), "{took:?}");
    assert!(
        took < Duration::from_millis(HEADERS_MS + 250),
        "failover took {took:?}"
    );
    gw.shutdown().await;
}

/// Streams one chat and returns (status, time of the last chunk, time the
/// body ended, whether it ended with an error, body bytes).
async fn stream_once(url: &str) -> (StatusCode, Duration, Duration, bool, Vec<u8>) {
    let started = Instant::now();
    let resp = client()
        .request(chat_request(url, true))
        .await
        .expect("response headers");
    let status = resp.status();
    let mut body = resp.into_body();
    let mut last = started.elapsed();
    let mut bytes = Vec::new();
    let errored = loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the response ends in time")
        {
            None => break false,
            Some(Err(_)) => break true,
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    bytes.extend_from_slice(&d);
                    last = started.elapsed();
                }
            }
        }
    };
    (status, last, started.elapsed(), errored, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_a_stalled_stream_after_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    const IDLE_MS: u64 = 300;
    let sims = sims(1).await;
    let doc = config_with(
        &sims,
        serde_json::json!({"timeouts": {"stream_idle_ms": IDLE_MS}}),
    );
    let gw = start_gateway(&doc, Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    // One small piece, then a 10 s gap: the stream has stalled.
    sims[0].inject(Fault::Drip {
        count: Some(1),
        bytes: 64,
        interval_ms: 10_000,
    });
    let (status, last, end, errored, bytes) = stream_once(&url).await;
    let gap = end - last;
    println!(
        "FIGURE stall_abort abort_after_last_chunk_ms={} stream_idle_ms={IDLE_MS} bytes_before={}",
        gap.as_millis(),
        bytes.len()
    );
    assert_eq!(status, StatusCode::OK);
    assert!(
        errored,
        "a stalled stream must end with an error, not cleanly"
    );
    assert!(!bytes.is_empty(), "the chunk before the stall arrived");
    assert!(gap >= Duration::from_millis(IDLE_MS - 20), "{gap:?}");
    assert!(gap < Duration::from_millis(IDLE_MS + 300), "{gap:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborts_the_client_response_when_the_backend_resets_mid_stream() {
    let _serial = SERIAL.lock().await;
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("sim0")
            .latency(5, 20)
            .reply_tokens(20),
    ])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    sims[0].inject(Fault::CloseMidStream {
        count: Some(1),
        after_chunks: 3,
    });
    let (status, last, end, errored, bytes) = stream_once(&url).await;
    let text = String::from_utf8_lossy(&bytes);
    println!(
        "FIGURE reset_abort abort_after_last_chunk_ms={} bytes_before={}",
        (end - last).as_millis(),
        bytes.len()
    );
    assert_eq!(status, StatusCode::OK);
    assert!(
        errored,
        "a reset stream must end with an error, not cleanly"
    );
    assert!(text.contains("data:"), "events before the reset arrived");
    assert!(!text.contains("[DONE]"));
    assert!(end - last < Duration::from_millis(200), "{:?}", end - last);

    // The next request is served normally: the reset did not poison the pool.
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_the_upstream_connection_within_100ms_of_a_client_disconnect() {
    let _serial = SERIAL.lock().await;
    // Tokens every 10 ms so the instance notices a closed socket promptly.
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("sim0")
            .latency(5, 10)
            .reply_tokens(2_000),
    ])
    .await;
    let gw = start_gateway(&config_for(&sims), Some(CLIENT_KEY)).await;
    let url = format!("{}{}", gw.url(), chat_path("gpt-4o"));
    let mut samples = Vec::new();
    for _ in 0..5 {
        let before = sims[0].open_connections();
        let c = client();
        let resp = c.request(chat_request(&url, true)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
        let during = sims[0].open_connections();
        assert!(during > before.saturating_sub(1), "streaming upstream");
        let seq = sims[0].journal().last().unwrap().seq;
        drop(body);
        drop(c);
        let dropped = Instant::now();
        let deadline = dropped + Duration::from_secs(2);
        let closed_after = loop {
            let e = sims[0]
                .journal()
                .into_iter()
                .find(|e| e.seq == seq)
                .unwrap();
            if e.outcome == aoai_sim::Outcome::ClientAborted {
                break dropped.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "upstream still streaming 2 s after the client left"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        samples.push(closed_after);
    }
    let worst = samples.iter().max().unwrap();
    println!(
        "FIGURE disconnect_close upstream_closed_after_ms={:?} worst_ms={}",
        samples.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        worst.as_millis()
    );
    assert!(*worst < Duration::from_millis(100), "{samples:?}");
    gw.shutdown().await;
}
