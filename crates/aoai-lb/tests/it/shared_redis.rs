//! State shared between replicas through a real `redis-server` (the Debian
//! package; `.ci/run` installs it): two gateway processes in front of the
//! same simulated instances. Each test starts its own server on a free
//! 127.0.0.1 port with nothing persisted and stops it by PID.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aoai_sim::{Fault, SimHandle};
use common::*;
use http::{HeaderMap, Method, StatusCode};

const API: &str = "api-version=2025-04-01-preview";

/// A `redis-server` child on its own port.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Redis {
        Self::launch(port, &["--port", &port.to_string()], Redis::pings)
    }

    /// Starts `redis-server` with `args` on loopback, persisting nothing, and
    /// waits up to 10 s for `ready`.
    fn launch(port: u16, args: &[&str], ready: fn(&Redis) -> bool) -> Redis {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (.ci/run installs the Debian package)");
        let r = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(&r) {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A stopped (SIGSTOP) server must be woken to die promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One gateway process.
pub(crate) struct Replica {
    pub(crate) bin: Binary,
    pub(crate) url: String,
    pub(crate) admin: String,
}

pub(crate) fn replica(doc: &str) -> Replica {
    let (bin, addr, admin_addr) = spawn_gateway_binary_with_admin(doc);
    Replica {
        bin,
        url: format!("http://{addr}"),
        admin: format!("http://{admin_addr}"),
    }
}

impl Replica {
    pub(crate) async fn redis_status(&self) -> serde_json::Value {
        get_json(&format!("{}/admin/redis", self.admin)).await
    }

    pub(crate) async fn wait_state(&self, state: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let v = self.redis_status().await;
            if v["state"] == state {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "not {state} within {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(crate) async fn metrics(&self) -> String {
        get_ok(&format!("{}/metrics", self.admin)).await
    }

    pub(crate) async fn chat(&self) -> (StatusCode, HeaderMap) {
        let (s, h, _) = send(
            Method::POST,
            &format!("{}{}", self.url, chat_path("gpt-4o")),
            &auth(),
            chat_body(false),
        )
        .await;
        (s, h)
    }
}

pub(crate) fn served_by(h: &HeaderMap) -> String {
    h.get("x-aoai-sim-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

/// Two sims, `sim0` preferred (priority 1) over `sim1` (priority 2), and a
/// `redis` block with `redis_extra` merged in.
async fn setup(redis: &Redis, redis_extra: serde_json::Value) -> (Vec<SimHandle>, String) {
    let sims = sims(2).await;
    let mut block = serde_json::json!({
        "url": redis.url(),
        "key_prefix": format!("t{}:", fastrand::u32(..)),
        "sync_interval_ms": 200,
        "op_timeout_ms": 100,
    });
    if let (Some(b), serde_json::Value::Object(extra)) = (block.as_object_mut(), redis_extra) {
        b.extend(extra);
    }
    let doc = config_with(
        &sims,
        serde_json::json!({
            "instances": [{"priority": 1}, {"priority": 2}],
            "redis": block,
        }),
    );
    (sims, doc)
}

pub(crate) fn throttle_once(sim: &SimHandle, retry_after_ms: u64) {
    sim.inject(Fault::Fail {
        count: Some(1),
        status: 429,
        body: None,
        retry_after_ms: Some(retry_after_ms),
    });
}

/// A 429 on replica A; then replicas B and C, within `within` of it, must
/// keep off the throttled instance for 20 requests each.
async fn propagation(redis_extra: serde_json::Value, within: Duration) -> serde_json::Value {
    let redis = Redis::start();
    let (sims, doc) = setup(&redis, redis_extra).await;
    let a = replica(&doc);
    let b = replica(&doc);
    let c = replica(&doc);
    for r in [&a, &b, &c] {
        r.wait_state("up", Duration::from_secs(5)).await;
    }

    throttle_once(&sims[0], 10_000);
    let (s, h) = a.chat().await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1", "A failed over after the 429");
    let seen = Instant::now();
    assert_eq!(sims[0].request_count(), 1);

    tokio::time::sleep(within).await;
    for _ in 0..20 {
        for r in [&b, &c] {
            let (s, h) = r.chat().await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(served_by(&h), "sim1", "B and C must skip sim0");
        }
    }
    assert_eq!(
        sims[0].request_count(),
        1,
        "neither B nor C sent sim0 a request (first one {:?} after A's 429)",
        within
    );
    assert!(
        c.redis_status().await["cooldowns_applied"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(serde_json::Value::as_u64)
            .sum::<u64>()
            >= 1
    );
    assert!(
        seen.elapsed() < Duration::from_secs(10),
        "within the cooldown"
    );
    b.redis_status().await
}

#[tokio::test]
async fn a_429_seen_by_one_replica_keeps_the_other_off_that_instance_through_pubsub() {
    // Pub/sub delivers within a round trip; the poll (every 200 ms) is
    // made long here so that only pub/sub can explain the result.
    let status = propagation(
        serde_json::json!({"sync_interval_ms": 30_000}),
        Duration::from_millis(100),
    )
    .await;
    assert!(
        status["cooldowns_applied"]["pubsub"].as_u64().unwrap() >= 1,
        "{status}"
    );
}

#[tokio::test]
async fn a_429_seen_by_one_replica_keeps_the_other_off_that_instance_through_the_poll_alone() {
    // No pub/sub: the poll every 200 ms must be enough within 200 ms plus
    // one round trip and some scheduling slack.
    let status = propagation(
        serde_json::json!({"pubsub": false}),
        Duration::from_millis(200 + 150),
    )
    .await;
    assert_eq!(status["cooldowns_applied"]["pubsub"], 0, "{status}");
    assert!(
        status["cooldowns_applied"]["poll"].as_u64().unwrap() >= 1,
        "{status}"
    );
}

#[tokio::test]
async fn a_shared_cooldown_is_never_shortened_by_a_shorter_one() {
    let redis = Redis::start();
    let (sims, doc) = setup(&redis, serde_json::json!({})).await;
    // B hears nothing from A (no pub/sub, a poll far away), so it still
    // sends sim0 a request after A's 429 and gets a shorter one itself.
    let mut deaf: serde_json::Value = serde_json::from_str(&doc).unwrap();
    deaf["redis"]["pubsub"] = false.into();
    deaf["redis"]["sync_interval_ms"] = 30_000.into();
    let key = format!(
        "{{{}cd}}:sim0",
        deaf["redis"]["key_prefix"].as_str().unwrap()
    );
    let a = replica(&doc);
    let b = replica(&deaf.to_string());
    a.wait_state("up", Duration::from_secs(5)).await;
    b.wait_state("up", Duration::from_secs(5)).await;

    throttle_once(&sims[0], 10_000);
    assert_eq!(served_by(&a.chat().await.1), "sim1");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(pttl(&redis, &key) > 9_000);

    throttle_once(&sims[0], 300);
    assert_eq!(served_by(&b.chat().await.1), "sim1");
    assert_eq!(sims[0].request_count(), 2, "B met its own, shorter 429");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let left = pttl(&redis, &key);
    assert!(left > 8_000, "the shared cooldown was shortened: {left} ms");
    // A received B's shorter one too and kept its own.
    for _ in 0..5 {
        assert_eq!(served_by(&a.chat().await.1), "sim1");
    }
    assert_eq!(sims[0].request_count(), 2);
}

/// Raw RESP round trip: `PTTL key`.
fn pttl(redis: &Redis, key: &str) -> i64 {
    let reply = resp(redis, &["PTTL", key]);
    reply.trim_start_matches(':').trim().parse().unwrap()
}

fn resp(redis: &Redis, args: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).unwrap();
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Cooldowns a replica has learnt from other replicas, by pub/sub or poll,
/// from its `/admin/redis` status.
pub(crate) fn learnt(status: &serde_json::Value) -> u64 {
    let applied = &status["cooldowns_applied"];
    applied["pubsub"].as_u64().unwrap_or(0) + applied["poll"].as_u64().unwrap_or(0)
}

/// Uploads a small batch file through `r` and returns the new file's id.
pub(crate) async fn upload_file(r: &Replica) -> String {
    let (ct, body) = multipart_file("{\"custom_id\":\"1\"}\n");
    let mut h: Vec<_> = auth()
        .into_iter()
        .filter(|(k, _)| *k != "content-type")
        .collect();
    h.push(("content-type", ct));
    let (s, _, created) = send(
        Method::POST,
        &format!("{}/openai/files?{API}", r.url),
        &h,
        body,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&created));
    serde_json::from_slice::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub(crate) fn file_hits(sim: &SimHandle) -> usize {
    sim.journal()
        .iter()
        .filter(|e| e.path.contains("/openai/files"))
        .count()
}

#[tokio::test]
async fn an_object_created_through_one_replica_is_read_through_the_other_on_the_first_try() {
    let redis = Redis::start();
    let (sims, doc) = setup(&redis, serde_json::json!({})).await;
    let a = replica(&doc);
    let b = replica(&doc);
    a.wait_state("up", Duration::from_secs(5)).await;
    b.wait_state("up", Duration::from_secs(5)).await;

    // The preferred sim0 fails the upload, so the file lives on sim1: a
    // search from B would ask sim0 first and get a 404.
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 503,
        body: None,
        retry_after_ms: None,
    });
    let id = upload_file(&a).await;
    assert_eq!(file_hits(&sims[1]), 1, "created on sim1");
    let sim0_before = file_hits(&sims[0]);

    // The background write lands within a round trip.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, _, got) = send(
        Method::GET,
        &format!("{}/openai/files/{id}?{API}", b.url),
        &auth(),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&got));
    assert_eq!(file_hits(&sims[0]), sim0_before, "B never asked sim0");
    assert_eq!(file_hits(&sims[1]), 2);
    let st = b.redis_status().await;
    assert_eq!(st["object_lookup_hits"], 1, "{st}");

    // Deleted through B: gone from Redis too, so a later look-up from A
    // (after a restart that empties its table) would search again.
    let (s, _, _) = send(
        Method::DELETE,
        &format!("{}/openai/files/{id}?{API}", b.url),
        &auth(),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let key_prefix =
        serde_json::from_str::<serde_json::Value>(&doc).unwrap()["redis"]["key_prefix"]
            .as_str()
            .unwrap()
            .to_owned();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reply = resp(&redis, &["EXISTS", &format!("{key_prefix}aff:{id}")]);
        if reply.starts_with(":0") {
            break;
        }
        assert!(Instant::now() < deadline, "still in Redis: {reply}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_make_no_redis_call_on_the_common_path() {
    let redis = Redis::start();
    let (_sims, doc) = setup(&redis, serde_json::json!({})).await;
    let a = replica(&doc);
    a.wait_state("up", Duration::from_secs(5)).await;
    for _ in 0..50 {
        assert_eq!(a.chat().await.0, StatusCode::OK);
    }
    let m = a.metrics().await;
    // Only two ops may run on a request's path: the look-up of an unknown
    // object id and the strict-mode quota take. Neither may appear.
    for op in ["lookup", "strict_take"] {
        assert!(
            !m.contains(&format!("op=\"{op}\"")),
            "{op} on the hot path:\n{m}"
        );
    }
    assert!(m.contains("aoai_lb_redis_up 1"), "{m}");
}

/// Requests sent by one load task, and those that failed.
pub(crate) type Load = (usize, Vec<(String, StatusCode)>);

/// Concurrent load on every replica until `stop` is set (bounded by
/// `max_each` requests per task as well): returns every status that was
/// not 200, with the replica it came from.
pub(crate) fn spawn_load(
    urls: Vec<String>,
    tasks: usize,
    max_each: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Load>> {
    (0..tasks)
        .map(|t| {
            let urls = urls.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                let mut failed = Vec::new();
                while sent < max_each && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let url = &urls[(t + sent) % urls.len()];
                    let (s, _, body) = send(
                        Method::POST,
                        &format!("{url}{}", chat_path("gpt-4o")),
                        &auth(),
                        chat_body(false),
                    )
                    .await;
                    if s != StatusCode::OK {
                        failed.push((format!("{url}: {}", String::from_utf8_lossy(&body)), s));
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (sent, failed)
            })
        })
        .collect()
}

pub(crate) async fn redis_up_gauge(r: &Replica) -> Option<String> {
    r.metrics()
        .await
        .lines()
        .find(|l| l.starts_with("aoai_lb_redis_up "))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_concurrent_load_fails_no_request_and_sharing_returns_after_a_restart() {
    let redis = Redis::start();
    let (sims, doc) = setup(&redis, serde_json::json!({})).await;
    let replicas = [replica(&doc), replica(&doc), replica(&doc)];
    for r in &replicas {
        r.wait_state("up", Duration::from_secs(5)).await;
    }

    // Six tasks spread over the three replicas, for the whole outage and
    // the restart; bounded by a flag and by 1 000 requests per task.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = spawn_load(
        replicas.iter().map(|r| r.url.clone()).collect(),
        6,
        1_000,
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = redis.stop();
    let killed = Instant::now();

    // Stated bound: DEGRADE_AFTER (3) polls of sync_interval_ms (200) plus
    // op_timeout_ms (100) = 900 ms; the rest is slack for a loaded machine.
    let bound = Duration::from_millis(900);
    for r in &replicas {
        r.wait_state("degraded", bound + Duration::from_millis(1_500))
            .await;
        assert_eq!(
            redis_up_gauge(r).await.as_deref(),
            Some("aoai_lb_redis_up 0")
        );
    }
    let all_degraded = killed.elapsed();
    assert!(
        all_degraded < bound + Duration::from_millis(1_500),
        "{all_degraded:?}"
    );

    // A 429 on sim0 while degraded stays local and fails nothing.
    throttle_once(&sims[0], 10_000);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Back on the same port, still under load: shared within two seconds.
    let restarted = Instant::now();
    let _redis = Redis::start_on(port);
    for r in &replicas {
        r.wait_state("up", Duration::from_secs(2)).await;
        assert_eq!(
            redis_up_gauge(r).await.as_deref(),
            Some("aoai_lb_redis_up 1")
        );
    }
    let back = restarted.elapsed();
    assert!(back < Duration::from_secs(2), "{back:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut sent = 0;
    let mut failed = Vec::new();
    for h in load {
        let (n, f) = h.await.unwrap();
        sent += n;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    assert!(sent >= 60, "the load ran: {sent} requests");
    eprintln!(
        "{sent} requests, all degraded after {all_degraded:?}, all shared again after {back:?}"
    );
    for r in &replicas {
        let lines = r.bin.all_text();
        let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
        assert_eq!(count("Redis does not answer"), 1, "one warning line");
        assert_eq!(count("Redis answers again"), 1, "one line on recovery");
    }

    // The replica that met the 429 re-published its cooldown on
    // recovery: some other replica learns it.
    let deadline = Instant::now() + Duration::from_secs(2);
    'learnt: loop {
        for r in &replicas {
            let st = r.redis_status().await;
            if learnt(&st) >= 1 {
                break 'learnt;
            }
        }
        assert!(Instant::now() < deadline, "no replica learnt the cooldown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_delays_no_request_under_concurrent_load() {
    let redis = Redis::start();
    let (_sims, doc) = setup(&redis, serde_json::json!({"lookup_timeout_ms": 20})).await;
    let a = std::sync::Arc::new(replica(&doc));
    let b = std::sync::Arc::new(replica(&doc));
    a.wait_state("up", Duration::from_secs(5)).await;
    b.wait_state("up", Duration::from_secs(5)).await;
    // The same pairs of requests from four tasks over two replicas, with
    // Redis healthy, then frozen (SIGSTOP: connections stay open, nothing
    // answers): the frozen run may only add the look-up timeout (20 ms).
    let slowest = |span: Duration| {
        let tasks: Vec<_> = [&a, &b, &a, &b]
            .into_iter()
            .map(|r| {
                let r = std::sync::Arc::clone(r);
                tokio::spawn(async move { slowest_pair(&r, span).await })
            })
            .collect();
        async move {
            let mut worst = Duration::ZERO;
            for t in tasks {
                worst = worst.max(t.await.unwrap());
            }
            worst
        }
    };
    // Warm-up: each replica's first requests open upstream connections.
    let _ = slowest(Duration::from_millis(500)).await;
    let healthy = slowest(Duration::from_secs(1)).await;
    redis.signal("-STOP");
    let frozen = slowest(Duration::from_secs(2)).await;
    redis.signal("-CONT");
    eprintln!("slowest pair: healthy {healthy:?}, frozen {frozen:?}");
    // The slack is wide (the slowest of many requests on a busy 2-core
    // machine swings by a few hundred ms either way); what it catches is a
    // request waiting on the frozen server, which would last the 2 s run.
    assert!(
        frozen < healthy + Duration::from_millis(20 + 480),
        "frozen {frozen:?}, healthy {healthy:?}"
    );
}

/// The slowest of repeated (chat, unknown-object read) pairs over `span`.
async fn slowest_pair(a: &Replica, span: Duration) -> Duration {
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while started.elapsed() < span {
        let t = Instant::now();
        assert_eq!(a.chat().await.0, StatusCode::OK);
        // An object id nobody knows: the one call that may wait on Redis,
        // bounded by lookup_timeout_ms (or skipped once degraded).
        let (s, _, _) = send(
            Method::GET,
            &format!("{}/openai/files/file-unknown123?{API}", a.url),
            &auth(),
            "",
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        slowest = slowest.max(t.elapsed());
    }
    slowest
}

#[tokio::test]
async fn a_replica_started_while_redis_is_down_serves_at_once_and_joins_later() {
    let port = free_port();
    let sims = sims(2).await;
    let doc = config_with(
        &sims,
        serde_json::json!({
            "redis": {"url": format!("redis://127.0.0.1:{port}"), "sync_interval_ms": 200, "op_timeout_ms": 100},
        }),
    );
    let a = replica(&doc);
    let (s, _) = a.chat().await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(a.redis_status().await["state"], "up");
    let _redis = Redis::start_on(port);
    a.wait_state("up", Duration::from_secs(3)).await;
    assert_eq!(a.chat().await.0, StatusCode::OK);
}

/// Two replicas sharing a client with `rpm` 30 (and an own window of 30
/// each, which alone would let 60 through), sent `count` requests
/// alternately: returns how many were admitted.
async fn admitted_across_two_replicas(
    mode: &str,
    count: usize,
) -> (usize, serde_json::Value, String) {
    admitted_with_limits(mode, count, serde_json::json!({"rpm": 30})).await
}

/// As [`admitted_across_two_replicas`] with the client's limits given.
async fn admitted_with_limits(
    mode: &str,
    count: usize,
    limits: serde_json::Value,
) -> (usize, serde_json::Value, String) {
    let redis = Redis::start();
    let sims = sims(1).await;
    let mut client = serde_json::json!({"name": "team", "key": "team-key-1"});
    if let (Some(c), serde_json::Value::Object(l)) = (client.as_object_mut(), limits) {
        c.extend(l);
    }
    let doc = config_with(
        &sims,
        serde_json::json!({
            "clients": [client],
            "redis": {
                "url": redis.url(),
                "key_prefix": format!("t{}:", fastrand::u32(..)),
                "sync_interval_ms": 200,
                "op_timeout_ms": 100,
                "quota_mode": mode,
            },
        }),
    );
    let a = replica(&doc);
    let b = replica(&doc);
    a.wait_state("up", Duration::from_secs(5)).await;
    b.wait_state("up", Duration::from_secs(5)).await;
    // Both replicas have heartbeaten and taken their first leases.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ok = admit_alternately(&a, &b, count).await;
    (ok, a.redis_status().await, a.metrics().await)
}

/// Sends up to `count` chats as client `team` (key `team-key-1`), in turn
/// to `a` and `b`, and returns how many were admitted; a 429 is a refusal,
/// any other status fails the test.
pub(crate) async fn admit_alternately(a: &Replica, b: &Replica, count: usize) -> usize {
    let headers = vec![
        ("api-key", "team-key-1".to_owned()),
        ("content-type", "application/json".to_owned()),
    ];
    let mut ok = 0;
    // Bounded by count, and by 45 s from the first admission: the limits
    // are per 60 s, so a run on a slow machine that went on past the
    // window would see room come back. (Not from the start: the first
    // limited request of a replica loads the tokenizer, which takes a while
    // in a debug build.)
    let mut first_ok: Option<Instant> = None;
    for i in 0..count {
        if first_ok.is_some_and(|t| t.elapsed() > Duration::from_secs(45)) {
            break;
        }
        let r = if i % 2 == 0 { a } else { b };
        let (s, _, body) = send(
            Method::POST,
            &format!("{}{}", r.url, chat_path("gpt-4o")),
            &headers,
            chat_body(false),
        )
        .await;
        match s {
            StatusCode::OK => {
                ok += 1;
                first_ok.get_or_insert_with(Instant::now);
            }
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("{other}: {}", String::from_utf8_lossy(&body)),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ok
}

#[tokio::test]
async fn two_replicas_together_admit_no_more_than_a_clients_rpm_with_leases() {
    let (ok, status, metrics) = admitted_across_two_replicas("lease", 90).await;
    // Never above the limit; under-use at most one lease per replica
    // (30 / (8 × replicas), at least 1: 3 before the replicas see each
    // other, 1 after).
    assert!(ok <= 30, "over the limit: {ok}");
    assert!(ok >= 30 - 2 * 3, "under-use beyond the stated bound: {ok}");
    assert_eq!(status["quotas"]["replicas_seen"], 2, "{status}");
    // Leases are taken in the background: no call per request.
    assert!(!metrics.contains("op=\"strict_take\""), "{metrics}");
    assert!(metrics.contains("op=\"lease\""), "{metrics}");
}

#[tokio::test]
async fn two_replicas_together_admit_exactly_a_clients_rpm_in_strict_mode() {
    let (ok, _, _) = admitted_across_two_replicas("strict", 60).await;
    assert_eq!(ok, 30);
}

#[tokio::test]
async fn two_replicas_together_stay_within_a_clients_tpm_with_leases() {
    // Every request reserves the same Azure-style estimate; the limit fits
    // ten of them and a half.
    let path = chat_path("gpt-4o");
    let est = aoai_lb::limits::estimate_tokens(
        path.split('?').next().unwrap(),
        "gpt-4o",
        chat_body(false).as_bytes(),
        4096,
    );
    assert!(est > 0);
    let tpm = est * 10 + est / 2;
    let (ok, _, _) = admitted_with_limits("lease", 3_000, serde_json::json!({"tpm": tpm})).await;
    assert!(ok <= 10, "over the limit: {ok} x {est} > {tpm}");
    // A lease here (tpm / 16) is smaller than one request: each replica
    // may hold up to one request's worth unused.
    assert!(ok >= 10 - 2, "under-use beyond the stated bound: {ok}");
}

/// Two replicas sharing a client `team` with `client_extra` merged in, a
/// `redis` block with `redis_extra`, and no drain delay.
async fn two_replicas_for_team(
    redis: &Redis,
    client_extra: serde_json::Value,
) -> (Vec<SimHandle>, Replica, Replica, String) {
    let sims = sims(1).await;
    let mut client = serde_json::json!({"name": "team", "key": "team-key-1"});
    if let (Some(c), serde_json::Value::Object(l)) = (client.as_object_mut(), client_extra) {
        c.extend(l);
    }
    let prefix = format!("t{}:", fastrand::u32(..));
    let doc = config_with(
        &sims,
        serde_json::json!({
            "clients": [client],
            "server": {"drain_delay_ms": 0, "shutdown_grace_ms": 5000},
            "redis": {
                "url": redis.url(),
                "key_prefix": prefix,
                "sync_interval_ms": 200,
                "op_timeout_ms": 100,
            },
        }),
    );
    let a = replica(&doc);
    let b = replica(&doc);
    a.wait_state("up", Duration::from_secs(5)).await;
    b.wait_state("up", Duration::from_secs(5)).await;
    (sims, a, b, prefix)
}

fn team_headers() -> Vec<(&'static str, String)> {
    vec![
        ("api-key", "team-key-1".to_owned()),
        ("content-type", "application/json".to_owned()),
    ]
}

/// The hash tag of client `name`'s keys (as the gateway builds it).
pub(crate) fn team_tag(prefix: &str, name: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(name.as_bytes());
    let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{{{prefix}q:{hex}}}")
}

/// `HGET key field` as a number (0 when missing).
fn hget(redis: &Redis, key: &str, field: &str) -> i64 {
    let reply = resp(redis, &["HGET", key, field]);
    // `$n\r\nvalue\r\n` or `$-1\r\n`
    reply
        .split("\r\n")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The sum of every field of a hash (`HVALS`).
fn hsum(redis: &Redis, key: &str) -> i64 {
    resp(redis, &["HVALS", key])
        .split("\r\n")
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .filter_map(|v| v.parse::<i64>().ok())
        .sum()
}

async fn quota_used_locally(r: &Replica) -> u64 {
    let (s, _, b) = send(
        Method::GET,
        &format!("{}/admin/clients", r.admin),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    let team = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "team")
        .unwrap();
    team["token_quota"]["used"].as_u64().unwrap()
}

#[tokio::test]
async fn two_replicas_together_stay_within_a_clients_token_quota() {
    let redis = Redis::start();
    // One request costs about 25 tokens by its estimate (prompt and
    // max_tokens 16); the quota fits about 16 of them. Each replica alone
    // would admit all of it.
    let quota = 400;
    let path = chat_path("gpt-4o");
    let est = aoai_lb::limits::estimate_tokens(
        path.split('?').next().unwrap(),
        "gpt-4o",
        chat_body(false).as_bytes(),
        4096,
    );
    let (_sims, a, b, prefix) = two_replicas_for_team(
        &redis,
        serde_json::json!({"token_quota": {"tokens": quota, "period": "day"}}),
    )
    .await;
    let mut statuses = std::collections::BTreeMap::new();
    let mut quota_refusals = [0; 2];
    // Bounded by count: alternate until both replicas refused twice.
    for i in 0..200 {
        if quota_refusals.iter().all(|&n| n >= 2) {
            break;
        }
        let r = if i % 2 == 0 { &a } else { &b };
        let (s, _, body) = send(
            Method::POST,
            &format!("{}{path}", r.url),
            &team_headers(),
            chat_body(false),
        )
        .await;
        *statuses.entry(s.as_u16()).or_insert(0) += 1;
        match s {
            StatusCode::OK | StatusCode::TOO_MANY_REQUESTS => {}
            StatusCode::FORBIDDEN => {
                let text = String::from_utf8_lossy(&body);
                assert!(text.contains("token quota of 400"), "{text}");
                quota_refusals[i % 2] += 1;
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(
        quota_refusals.iter().all(|&n| n >= 2),
        "both replicas reach the shared quota: {statuses:?}"
    );
    let (ua, ub) = (quota_used_locally(&a).await, quota_used_locally(&b).await);
    let total = ua + ub;
    eprintln!("used {ua} + {ub} = {total} of {quota} (estimate {est}); {statuses:?}");
    // The stated bound: at most one request's estimate per replica over
    // the quota; and, with traffic on both past the quota, no lease left
    // unused beyond one request each.
    assert!(total <= quota + 2 * est, "over the bound: {total}");
    assert!(
        total + 2 * est >= quota,
        "under-use beyond the bound: {total}"
    );
    assert!(ua > 0 && ub > 0, "both replicas served: {ua} {ub}");
    let key = format!("{}:quota", team_tag(&prefix, "team"));
    let used_in_redis = hget(&redis, &key, "used");
    assert!(
        used_in_redis >= i64::try_from(quota).unwrap(),
        "Redis: {used_in_redis}"
    );
    let st = a.redis_status().await;
    assert_eq!(
        st["quotas"]["clients"]["team"]["token_quota"]["used_up"], true,
        "{st}"
    );
}

#[tokio::test]
async fn a_replica_gives_its_unused_leases_back_on_shutdown_and_never_waits_long_for_redis() {
    let redis = Redis::start();
    // rpm 1600 and a quota of 64 000 a day: leases of 100 requests and
    // 500 tokens per replica (more before the replicas see each other).
    let (_sims, mut a, mut b, prefix) = two_replicas_for_team(
        &redis,
        serde_json::json!({"rpm": 1600, "token_quota": {"tokens": 64_000, "period": "day"}}),
    )
    .await;
    let tag = team_tag(&prefix, "team");
    let (rpm_key, quota_key) = (format!("{tag}:rpm"), format!("{tag}:quota"));
    // Both hold leases, and no more top-ups happen without traffic.
    let deadline = Instant::now() + Duration::from_secs(5);
    let lease = |st: &serde_json::Value, dim: &str| {
        st["quotas"]["clients"]["team"][dim]["lease_left"]
            .as_i64()
            .unwrap_or(0)
    };
    loop {
        let (sa, sb) = (a.redis_status().await, b.redis_status().await);
        if lease(&sa, "rpm") > 0
            && lease(&sb, "rpm") > 0
            && lease(&sa, "token_quota") > 0
            && lease(&sb, "token_quota") > 0
            && sa["quotas"]["replicas_seen"] == 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "{sa}\n{sb}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sa = a.redis_status().await;
    let (rpm_a, quota_a) = (lease(&sa, "rpm"), lease(&sa, "token_quota"));
    let (rpm_before, quota_before) = (hsum(&redis, &rpm_key), hget(&redis, &quota_key, "used"));
    assert!(rpm_before >= rpm_a && quota_before >= quota_a);

    let t = Instant::now();
    a.bin.signal("TERM");
    assert!(a.bin.wait_exit(Duration::from_secs(5)).is_some());
    let took = t.elapsed();
    assert!(
        a.bin
            .all_text()
            .iter()
            .any(|l| l.contains("gave unused quota leases back to Redis")),
        "{:#?}",
        a.bin.all_text()
    );
    assert_eq!(hsum(&redis, &rpm_key), rpm_before - rpm_a, "rpm lease back");
    assert_eq!(
        hget(&redis, &quota_key, "used"),
        quota_before - quota_a,
        "quota lease back"
    );

    // Frozen Redis: the give-back gives up after op_timeout_ms (100); the
    // shutdown takes no longer than a healthy one plus that, with slack.
    redis.signal("-STOP");
    let t = Instant::now();
    b.bin.signal("TERM");
    assert!(b.bin.wait_exit(Duration::from_secs(5)).is_some());
    let frozen = t.elapsed();
    redis.signal("-CONT");
    eprintln!("shutdown with Redis healthy {took:?}, frozen {frozen:?}");
    assert!(
        frozen < took + Duration::from_millis(100 + 1_000),
        "frozen {frozen:?}, healthy {took:?}"
    );
    assert!(
        b.bin
            .all_text()
            .iter()
            .any(|l| l.contains("could not give unused quota leases back")),
        "{:#?}",
        b.bin.all_text()
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files
/// in a directory of their own (removed on drop).
pub(crate) struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "aoai-lb-redis-tls-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // A name of its own: a second CA is then an unknown issuer.
        ca.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("aoai-lb test CA {:08x}", fastrand::u32(..)),
        );
        let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    pub(crate) fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` serving TLS only, with `pki`'s server certificate.
fn start_tls_redis(pki: &Pki) -> Redis {
    let port = free_port();
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    // Plain PING cannot be spoken to a TLS port: accepting a connection is the sign.
    Redis::launch(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
        |r| TcpStream::connect(("127.0.0.1", r.port)).is_ok(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_shares_cooldowns_and_a_wrong_ca_is_refused_with_requests_served()
{
    let pki = Pki::new();
    let redis = start_tls_redis(&pki);
    let tls = serde_json::json!({
        "url": format!("rediss://127.0.0.1:{}", redis.port),
        "ca_file": pki.path("ca.pem"),
    });
    let (sims, doc) = setup(&redis, tls).await;
    let a = replica(&doc);
    let b = replica(&doc);
    a.wait_state("up", Duration::from_secs(5)).await;
    b.wait_state("up", Duration::from_secs(5)).await;
    assert_eq!(b.redis_status().await["tls"], true);

    // A cooldown published by A over TLS keeps B off sim0.
    throttle_once(&sims[0], 10_000);
    assert_eq!(served_by(&a.chat().await.1), "sim1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        let (s, h) = b.chat().await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(served_by(&h), "sim1");
    }
    assert_eq!(sims[0].request_count(), 1, "B never sent sim0 a request");

    // A replica trusting another CA never connects: one clear warning, and
    // it serves on local state.
    let other = Pki::new();
    let mut wrong: serde_json::Value = serde_json::from_str(&doc).unwrap();
    wrong["redis"]["ca_file"] = other.path("ca.pem").into();
    let c = replica(&wrong.to_string());
    c.wait_state("degraded", Duration::from_secs(5)).await;
    let line = c
        .bin
        .wait_for_line(Duration::from_secs(2), |l| {
            l.contains("Redis does not answer")
        })
        .unwrap();
    assert!(
        line.contains("certificate") || line.contains("UnknownIssuer"),
        "the warning names the certificate problem: {line}"
    );
    eprintln!("{line}");
    for _ in 0..5 {
        assert_eq!(c.chat().await.0, StatusCode::OK);
    }
}

#[test]
fn a_missing_or_empty_ca_file_stops_start_up_naming_the_field() {
    let pki = Pki::new();
    std::fs::write(pki.path("empty.pem"), "not a certificate\n").unwrap();
    for (file, why) in [
        (pki.path("nope.pem"), "cannot read"),
        (pki.path("empty.pem"), "holds no PEM certificate"),
    ] {
        let doc = serde_json::json!({
            "instances": [{"name": "a", "url": "https://a.example.com", "api_key": "k"}],
            "redis": {"url": "rediss://127.0.0.1:6380", "ca_file": file},
        })
        .to_string();
        let (status, lines) = run_binary(
            &[],
            &[("OPENAI_INSTANCES", doc.as_str()), ("API_KEY", CLIENT_KEY)],
            Duration::from_secs(20),
        );
        assert!(!status.success());
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        assert!(
            text.iter()
                .any(|l| l.contains("redis.ca_file:") && l.contains(why)),
            "{text:#?}"
        );
    }
}
