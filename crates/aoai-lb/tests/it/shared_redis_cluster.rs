//! State shared between replicas through a real Redis Cluster: the OSS
//! cluster protocol that Azure Cache for Redis and Azure Managed Redis
//! speak with the OSS cluster policy (`MOVED`/`ASK`, `CLUSTER SLOTS`).
//! Each test starts three masters from Debian's `redis-server` (cluster
//! mode, nothing persisted, free 127.0.0.1 ports), assigns the slots and
//! joins them with `CLUSTER ADDSLOTSRANGE` / `CLUSTER MEET` through
//! `redis-cli` (package `redis-tools`, which `redis-server` depends on),
//! puts two gateway processes in front of aoai-sim, and stops every process
//! by PID at the end. The gateways are given the first node's address
//! only, with `redis.cluster` left at `auto`. Cluster bus ports are given
//! explicitly (the default, port + 10000, may be taken or out of range).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;
use crate::shared_redis::{
    Pki, Replica, admit_alternately, file_hits, learnt, redis_up_gauge, replica, served_by,
    spawn_load, team_tag, throttle_once, upload_file,
};

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aoai_sim::{Fault, SimHandle};
use common::*;
use http::{Method, StatusCode};

const API: &str = "api-version=2025-04-01-preview";
/// The slots of master `i` as assigned at start.
const RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// One `redis-server` in cluster mode.
struct Node {
    child: Option<Child>,
    port: u16,
    /// The cluster bus port, given explicitly: the default (port + 10000)
    /// may be taken, or above 65535 for a high ephemeral port.
    bus: u16,
}

/// Three masters, no replicas (a killed master's slots stay down until it
/// comes back, as with a shard whose primary and replica are both lost).
struct Cluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    /// With TLS: the certificate files (`redis-cli --tls --cacert ...`).
    tls: Option<(String, String, String)>,
}

impl Cluster {
    fn start() -> Cluster {
        Self::start_with([free_port(), free_port(), free_port()], None)
    }

    /// Three masters on `ports`; with `tls` (CA, certificate, key files),
    /// TLS only, cluster bus included.
    fn start_with(ports: [u16; 3], tls: Option<(String, String, String)>) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "aoai-lb-cluster-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster {
            nodes: Vec::new(),
            dir,
            tls,
        };
        for port in ports {
            let bus = free_port();
            let child = c.spawn(port, bus);
            c.nodes.push(Node {
                child: Some(child),
                port,
                bus,
            });
        }
        for i in 0..3 {
            c.wait_pong(i);
        }
        for (i, (from, to)) in RANGES.iter().enumerate() {
            let r = c.cli(
                i,
                &[
                    "CLUSTER",
                    "ADDSLOTSRANGE",
                    &from.to_string(),
                    &to.to_string(),
                ],
            );
            assert_eq!(r, "OK", "ADDSLOTSRANGE: {r}");
        }
        for i in 1..3 {
            let (port, bus) = (c.nodes[i].port.to_string(), c.nodes[i].bus.to_string());
            let r = c.cli(0, &["CLUSTER", "MEET", "127.0.0.1", &port, &bus]);
            assert_eq!(r, "OK", "MEET: {r}");
        }
        c.wait_ok(Duration::from_secs(10));
        c
    }

    /// `redis-cli` to node `i`, its output trimmed (errors included: the
    /// CLI prints them on stdout too when not on a terminal).
    fn cli(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.nodes[i].port.to_string()]);
        if let Some((ca, _, _)) = &self.tls {
            cmd.args(["--tls", "--cacert", ca]);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH (Debian redis-tools, a dependency of redis-server)");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text.trim().to_owned()
    }

    /// Starts a cluster-mode server on `port` (bus on `bus`) whose node
    /// config lives in this cluster's directory (so a restart rejoins as
    /// the same node).
    fn spawn(&self, port: u16, bus: u16) -> Child {
        let conf = self.dir.join(format!("nodes-{port}.conf"));
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &port.to_string()]),
            Some((ca, cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                .args(["--tls-ca-cert-file", ca, "--tls-cert-file", cert])
                .args(["--tls-key-file", key]),
        };
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
            .args(["--cluster-port", &bus.to_string()])
            .arg("--cluster-config-file")
            .arg(&conf)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (.ci/run installs the Debian package)")
    }

    fn wait_pong(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(i, &["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "node {i} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every running node sees all 16384 slots served.
    fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = (0..3).filter(|&i| self.nodes[i].child.is_some()).all(|i| {
                let info = self.cli(i, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.nodes[0].port)
    }

    fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    fn node_id(&self, i: usize) -> String {
        self.cli(i, &["CLUSTER", "MYID"])
    }

    fn slot(&self, key: &str) -> u16 {
        self.cli(0, &["CLUSTER", "KEYSLOT", key]).parse().unwrap()
    }

    /// The master that owned `key`'s slot at start.
    fn first_owner(&self, key: &str) -> usize {
        let slot = self.slot(key);
        RANGES
            .iter()
            .position(|(a, b)| (*a..=*b).contains(&slot))
            .unwrap()
    }

    /// Whether node `i` holds `key` (answers `EXISTS` itself, without a
    /// redirection, and says 1).
    fn holds(&self, i: usize, key: &str) -> bool {
        self.cli(i, &["EXISTS", key]) == "1"
    }

    /// Subscribers of `channel` on node `i` (pub/sub is per node).
    fn subscribers(&self, i: usize, channel: &str) -> u64 {
        let out = self.cli(i, &["PUBSUB", "NUMSUB", channel]);
        out.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0)
    }

    /// Starts moving `slot` from master `from` to master `to` the way
    /// `redis-cli --cluster reshard` does (importing/migrating, then its
    /// keys with `MIGRATE`); `from` still owns it and answers `ASK` for the
    /// keys moved.
    fn begin_migration(&self, slot: u16, from: usize, to: usize) {
        let s = slot.to_string();
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let r = self.cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        assert_eq!(r, "OK", "{r}");
        let r = self.cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        assert_eq!(r, "OK", "{r}");
        let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "1000"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if !keys.is_empty() {
            let to_port = self.port(to).to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            let r = self.cli(from, &args);
            assert_eq!(r, "OK", "MIGRATE: {r}");
        }
    }

    /// Ends the move: every node is told that `to` owns `slot`.
    fn end_migration(&self, slot: u16, from: usize, to: usize) {
        let s = slot.to_string();
        let to_id = self.node_id(to);
        for i in [to, from, 3 - to - from] {
            let r = self.cli(i, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
            assert_eq!(r, "OK", "{r}");
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its port with its node config: it rejoins
    /// with its slots (and no data).
    fn restart(&mut self, i: usize) {
        let child = self.spawn(self.nodes[i].port, self.nodes[i].bus);
        self.nodes[i].child = Some(child);
        self.wait_pong(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A key prefix whose cooldown keys (`{P cd}`) land on master `cd_on` and
/// whose client `team`'s quota keys land on another master: the design
/// spreads keys over the cluster, one slot per script.
fn prefix_for(cluster: &Cluster, cd_on: usize) -> String {
    for _ in 0..1_000 {
        let p = format!("t{}:", fastrand::u32(..));
        let cd = cluster.first_owner(&format!("{{{p}cd}}:x"));
        let q = cluster.first_owner(&format!("{}:rpm", team_tag(&p, "team")));
        if cd == cd_on && q != cd {
            return p;
        }
    }
    panic!("no prefix found");
}

/// Two sims, `sim0` preferred, a client `team` with `client`'s limits, and
/// a `redis` block on `url` with `extra` merged in.
async fn setup(
    url: &str,
    prefix: &str,
    client: serde_json::Value,
    extra: serde_json::Value,
) -> (Vec<SimHandle>, String) {
    let sims = sims(2).await;
    let mut team = serde_json::json!({"name": "team", "key": "team-key-1"});
    if let (Some(t), serde_json::Value::Object(l)) = (team.as_object_mut(), client) {
        t.extend(l);
    }
    let mut block = serde_json::json!({
        "url": url,
        "key_prefix": prefix,
        "sync_interval_ms": 200,
        // The default: a redirected command takes a few round trips, and
        // three timeouts in a row on a busy test machine would degrade.
        "op_timeout_ms": 250,
    });
    if let (Some(b), serde_json::Value::Object(extra)) = (block.as_object_mut(), extra) {
        b.extend(extra);
    }
    let doc = config_with(
        &sims,
        serde_json::json!({
            "instances": [{"priority": 1}, {"priority": 2}],
            "clients": [team],
            "redis": block,
        }),
    );
    (sims, doc)
}

async fn both_up(a: &Replica, b: &Replica) {
    for r in [a, b] {
        r.wait_state("up", Duration::from_secs(8)).await;
        assert_eq!(r.redis_status().await["mode"], "cluster", "auto-detected");
    }
}

/// Waits until `r` has learnt at least `n` cooldowns from other replicas.
async fn wait_learnt(r: &Replica, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let st = r.redis_status().await;
        let seen = learnt(&st);
        if seen >= n {
            return;
        }
        assert!(Instant::now() < deadline, "learnt {seen} < {n}: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn script_errors(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("aoai_lb_redis_ops_total{") && l.contains("outcome=\"error\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn on_a_cluster_a_429_and_an_object_reach_the_other_replica_with_each_scripts_keys_in_one_slot()
 {
    let cluster = Cluster::start();
    // Cooldowns on master 0; the subscribers listen elsewhere, so a
    // message can only reach them over the cluster bus.
    let prefix = prefix_for(&cluster, 0);
    let (sims, doc) = setup(
        &cluster.url(),
        &prefix,
        serde_json::json!({}),
        // A poll every 30 s: only pub/sub can explain a fast propagation.
        serde_json::json!({"sync_interval_ms": 30_000}),
    )
    .await;
    let a = replica(&doc);
    let b = replica(&doc);
    both_up(&a, &b).await;

    let channel = format!("{prefix}events");
    let deadline = Instant::now() + Duration::from_secs(3);
    let per_node = loop {
        let per_node: Vec<u64> = (0..3).map(|i| cluster.subscribers(i, &channel)).collect();
        if per_node.iter().sum::<u64>() == 2 {
            break per_node;
        }
        assert!(Instant::now() < deadline, "subscribers: {per_node:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        per_node[1] + per_node[2] >= 1,
        "a subscriber sits on a node other than the publishing one: {per_node:?}"
    );

    throttle_once(&sims[0], 10_000);
    let (s, h) = a.chat().await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(served_by(&h), "sim1", "A failed over after the 429");
    wait_learnt(&b, 1, Duration::from_secs(1)).await;
    for _ in 0..10 {
        let (s, h) = b.chat().await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(served_by(&h), "sim1", "B skips sim0");
    }
    assert_eq!(sims[0].request_count(), 1);
    assert!(
        b.redis_status().await["cooldowns_applied"]["pubsub"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // The cooldown key and the replica register share one slot (the
    // poll is one pipeline, the heartbeat one script) on master 0.
    let cd_key = format!("{{{prefix}cd}}:sim0");
    let replicas_key = format!("{{{prefix}cd}}replicas");
    assert_eq!(cluster.slot(&cd_key), cluster.slot(&replicas_key));
    assert!(cluster.holds(0, &cd_key) && cluster.holds(0, &replicas_key));
    let elsewhere = cluster.cli(1, &["PTTL", &cd_key]);
    assert!(elsewhere.starts_with("MOVED"), "{elsewhere}");

    // An object created through A is found through B on the first try.
    sims[0].inject(Fault::Fail {
        count: Some(1),
        status: 503,
        body: None,
        retry_after_ms: None,
    });
    // sim0 cools down: the upload goes to sim1 anyway.
    let id = upload_file(&a).await;
    let aff_key = format!("{prefix}aff:{id}");
    let owner = cluster.first_owner(&aff_key);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cluster.holds(owner, &aff_key) {
        assert!(Instant::now() < deadline, "affinity never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sim0_before = file_hits(&sims[0]);
    let (s, _, got) = send(
        Method::GET,
        &format!("{}/openai/files/{id}?{API}", b.url),
        &auth(),
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&got));
    assert_eq!(file_hits(&sims[0]), sim0_before, "B never asked sim0");
    assert_eq!(b.redis_status().await["object_lookup_hits"], 1);

    for r in [&a, &b] {
        let m = r.metrics().await;
        assert_eq!(script_errors(&m), 0.0, "no CROSSSLOT or other error: {m}");
    }

    // Told it is a single server, a replica given master 1 meets MOVED
    // (the cooldowns live on master 0): it serves on its own state and
    // says which setting to change.
    let mut forced: serde_json::Value = serde_json::from_str(&doc).unwrap();
    forced["redis"]["cluster"] = serde_json::json!(false);
    forced["redis"]["sync_interval_ms"] = serde_json::json!(200);
    forced["redis"]["url"] = serde_json::json!(format!("redis://127.0.0.1:{}", cluster.port(1)));
    let c = replica(&forced.to_string());
    c.wait_state("degraded", Duration::from_secs(5)).await;
    let st = c.redis_status().await;
    assert_eq!(st["mode"], "standalone");
    let last_error = st["last_error"].as_str().unwrap();
    assert!(
        last_error.contains("set redis.cluster to \"auto\" or true"),
        "{st}"
    );
    assert_eq!(c.chat().await.0, StatusCode::OK);
}

/// Sends `count` requests of client `team`, alternately through `a` and
/// `b`: how many were admitted.
#[tokio::test]
async fn on_a_cluster_two_replicas_hold_a_clients_rpm_with_leases_and_exactly_in_strict_mode() {
    let cluster = Cluster::start();
    for (mode, cd_on) in [("lease", 1), ("strict", 2)] {
        let prefix = prefix_for(&cluster, cd_on);
        let (_sims, doc) = setup(
            &cluster.url(),
            &prefix,
            serde_json::json!({"rpm": 30}),
            serde_json::json!({"quota_mode": mode}),
        )
        .await;
        let a = replica(&doc);
        let b = replica(&doc);
        both_up(&a, &b).await;
        // Both replicas have heartbeaten and taken their first leases.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ok = admit_alternately(&a, &b, 70).await;
        if mode == "strict" {
            assert_eq!(ok, 30, "strict mode is exact");
        } else {
            // As on one server: never above, under-use at most one lease
            // per replica.
            assert!((30 - 2 * 3..=30).contains(&ok), "{mode}: {ok}");
            assert_eq!(a.redis_status().await["quotas"]["replicas_seen"], 2);
        }
        // Both dimensions of the client share one slot, on a master other
        // than the cooldowns'.
        let rpm_key = format!("{}:rpm", team_tag(&prefix, "team"));
        let q_on = cluster.first_owner(&rpm_key);
        assert_ne!(q_on, cd_on);
        assert_eq!(
            cluster.slot(&rpm_key),
            cluster.slot(&format!("{}:tpm", team_tag(&prefix, "team")))
        );
        assert!(cluster.holds(q_on, &rpm_key), "{mode}: {rpm_key} on {q_on}");
        let heartbeat = format!("{{{prefix}cd}}replicas");
        assert!(cluster.holds(cd_on, &heartbeat));
        for r in [&a, &b] {
            let m = r.metrics().await;
            assert_eq!(
                script_errors(&m),
                0.0,
                "{mode}: no CROSSSLOT or other error: {m}"
            );
            let op = if mode == "strict" {
                "strict_take"
            } else {
                "lease"
            };
            assert!(m.contains(&format!("op=\"{op}\"")), "{mode}: {m}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_ask_and_moved_are_followed_and_a_killed_master_fails_no_request() {
    let mut cluster = Cluster::start();
    let prefix = prefix_for(&cluster, 0);
    let (sims, doc) = setup(
        &cluster.url(),
        &prefix,
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    let a = replica(&doc);
    let b = replica(&doc);
    both_up(&a, &b).await;
    let channel = format!("{prefix}events");
    let cd_key = format!("{{{prefix}cd}}:sim0");

    let learnt_again = async |n: u64| {
        // The last cooldown (1.2 s) is over everywhere.
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        throttle_once(&sims[0], 1_200);
        assert_eq!(served_by(&a.chat().await.1), "sim1");
        wait_learnt(&b, n, Duration::from_secs(1)).await;
        assert_eq!(served_by(&b.chat().await.1), "sim1", "B keeps off sim0");
    };

    // A first cooldown lands on master 0.
    throttle_once(&sims[0], 1_200);
    assert_eq!(served_by(&a.chat().await.1), "sim1");
    wait_learnt(&b, 1, Duration::from_secs(1)).await;
    assert!(cluster.holds(0, &cd_key));

    // The slot moves to the master the subscribers listen on (the one to
    // be killed below). While it migrates, master 0 answers ASK for the
    // keys already moved; the gateways' polls and scripts follow it.
    let deadline = Instant::now() + Duration::from_secs(3);
    let target = loop {
        if let Some(t) = (1..3).find(|&i| cluster.subscribers(i, &channel) >= 1) {
            break t;
        }
        assert!(Instant::now() < deadline, "no subscriber off master 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let slot = cluster.slot(&cd_key);
    let target_addr = format!("{slot} 127.0.0.1:{}", cluster.port(target));
    cluster.begin_migration(slot, 0, target);
    let asked = cluster.cli(0, &["PTTL", &cd_key]);
    assert!(asked.starts_with(&format!("ASK {target_addr}")), "{asked}");
    learnt_again(2).await;

    // Migrated: master 0 now answers MOVED, and the gateways, whose slot
    // map still names master 0, follow it and refresh the map.
    cluster.end_migration(slot, 0, target);
    let moved = cluster.cli(0, &["PTTL", &cd_key]);
    assert!(
        moved.starts_with(&format!("MOVED {target_addr}")),
        "{moved}"
    );
    learnt_again(3).await;
    assert_eq!(sims[0].request_count(), 3, "B never sent sim0 a request");
    assert!(cluster.holds(target, &cd_key));
    assert!(!cluster.holds(0, &cd_key));
    for r in [&a, &b] {
        assert_eq!(r.redis_status().await["state"], "up");
        let lines = r.bin.all_text();
        assert!(
            !lines.iter().any(|l| l.contains("Redis does not answer")),
            "never degraded while the slot moved"
        );
    }
    tokio::time::sleep(Duration::from_millis(1_300)).await;

    // Kill that master under load: its slots (the cooldowns') are gone
    // and so is the subscribers' node.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = spawn_load(vec![a.url.clone(), b.url.clone()], 2, 1_000, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(target);
    let killed = Instant::now();
    for r in [&a, &b] {
        // DEGRADE_AFTER (3) polls of 200 ms plus the 250 ms timeout, with
        // slack for a loaded machine.
        r.wait_state("degraded", Duration::from_millis(1_350 + 1_500))
            .await;
        assert_eq!(
            redis_up_gauge(r).await.as_deref(),
            Some("aoai_lb_redis_up 0")
        );
    }
    let degraded_after = killed.elapsed();
    // The subscribers moved to a node that is alive.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let moved: u64 = (0..3)
            .filter(|&i| i != target)
            .map(|i| cluster.subscribers(i, &channel))
            .sum();
        if moved == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscribers did not move: {moved}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Down long enough for the other masters to have marked it failed
    // and to clear that at once when it answers again (twice the node
    // timeout), as after a real outage.
    tokio::time::sleep(Duration::from_millis(2_500).saturating_sub(killed.elapsed())).await;

    // Back on the same port with its node config: the cluster heals (the
    // other masters clear its failure, it waits out its own start-up
    // delay) and both replicas share again.
    let restarted = Instant::now();
    cluster.restart(target);
    for r in [&a, &b] {
        r.wait_state("up", Duration::from_secs(8)).await;
        assert_eq!(
            redis_up_gauge(r).await.as_deref(),
            Some("aoai_lb_redis_up 1")
        );
    }
    let back = restarted.elapsed();
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
    assert!(sent >= 40, "the load ran: {sent} requests");
    eprintln!(
        "{sent} requests, degraded after {degraded_after:?}, shared again {back:?} after the restart"
    );
    for r in [&a, &b] {
        // The line follows the state change by a log-writer tick.
        let _ = r.bin.wait_for_line(Duration::from_secs(2), |l| {
            l.contains("Redis answers again")
        });
        let lines = r.bin.all_text();
        let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
        let redis_lines: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("Redis") || l.contains("dropped"))
            .collect();
        // One warning and one recovery line per outage, never one per
        // request. A master that rejoins may answer CLUSTERDOWN once more
        // while the others clear its failure: a second, short outage.
        let (down, again) = (count("Redis does not answer"), count("Redis answers again"));
        assert!(
            down == again && (1..=2).contains(&down),
            "{down} warnings, {again} recoveries: {redis_lines:#?}"
        );
    }

    // Sharing works again: a 429 seen by A reaches B.
    let before = learnt(&b.redis_status().await);
    throttle_once(&sims[0], 10_000);
    assert_eq!(served_by(&a.chat().await.1), "sim1");
    wait_learnt(&b, before + 1, Duration::from_secs(2)).await;
    assert_eq!(served_by(&b.chat().await.1), "sim1");
}

/// A 429 seen by `a` keeps `b` off `sim0` within a second.
async fn propagates(sims: &[SimHandle], a: &Replica, b: &Replica) {
    let before = learnt(&b.redis_status().await);
    let sim0 = sims[0].request_count();
    throttle_once(&sims[0], 10_000);
    assert_eq!(served_by(&a.chat().await.1), "sim1");
    wait_learnt(b, before + 1, Duration::from_secs(1)).await;
    for _ in 0..5 {
        assert_eq!(served_by(&b.chat().await.1), "sim1");
    }
    assert_eq!(sims[0].request_count(), sim0 + 1, "only A's request");
}

#[tokio::test]
async fn on_a_cluster_a_replica_started_while_the_cluster_is_down_serves_at_once_and_joins_later() {
    let ports = [free_port(), free_port(), free_port()];
    let prefix = format!("t{}:", fastrand::u32(..));
    let url = format!("redis://127.0.0.1:{}", ports[0]);
    let (sims, doc) = setup(&url, &prefix, serde_json::json!({}), serde_json::json!({})).await;
    let a = replica(&doc);
    let (s, _) = a.chat().await;
    assert_eq!(s, StatusCode::OK);
    let st = a.redis_status().await;
    assert_ne!(st["state"], "up", "{st}");
    assert!(
        st["mode"].is_null(),
        "not settled before Redis answers: {st}"
    );

    let _cluster = Cluster::start_with(ports, None);
    let b = replica(&doc);
    both_up(&a, &b).await;
    propagates(&sims, &a, &b).await;
}

#[tokio::test]
async fn on_a_cluster_over_tls_with_a_private_ca_two_replicas_share_cooldowns() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let files = (ca.clone(), pki.path("server.pem"), pki.path("server.key"));
    let cluster = Cluster::start_with([free_port(), free_port(), free_port()], Some(files));
    let prefix = prefix_for(&cluster, 2);
    let url = format!("rediss://127.0.0.1:{}", cluster.port(0));
    let (sims, doc) = setup(
        &url,
        &prefix,
        serde_json::json!({}),
        serde_json::json!({"ca_file": ca}),
    )
    .await;
    let a = replica(&doc);
    let b = replica(&doc);
    both_up(&a, &b).await;
    assert_eq!(a.redis_status().await["tls"], true);
    propagates(&sims, &a, &b).await;
    // The cooldown reached master 2 over TLS (the seed is master 0).
    assert!(cluster.holds(2, &format!("{{{prefix}cd}}:sim0")));
}
