//! The binary's contract: instance i on base-port + i with the given key, a config
//! file that sets everything per instance, admin routes, clean exit on SIGTERM,
//! and one-line failures for bad config.

// The process helpers below fail the test loudly, like assertions do.
#![allow(clippy::unwrap_used, clippy::panic)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_aoai-sim");

/// A base port unlikely to collide between tests running in parallel.
fn free_base(n: u16) -> u16 {
    // Bind n consecutive ephemeral-range ports to check they are free right now.
    for _ in 0..50 {
        let base = 20_000 + fastrand::u16(..20_000);
        let ok = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no free port range");
}

struct Sim {
    child: Child,
    lines: Vec<String>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn the binary and wait for one "listening" line per instance.
fn spawn(args: &[&str], instances: usize) -> Sim {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines
        .iter()
        .filter(|l: &&String| l.contains("listening on"))
        .count()
        < instances
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("simulator did not start: {lines:?}"),
        }
    }
    Sim { child, lines }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn serves_instance_i_on_base_port_plus_i_with_the_given_key() {
    let base = free_base(3);
    let b = base.to_string();
    let mut sim = spawn(
        &["--instances", "3", "--base-port", &b, "--api-key", "k9"],
        3,
    );
    for i in 0..3u16 {
        let url = format!("http://127.0.0.1:{}", base + i);
        assert!(
            sim.lines
                .iter()
                .any(|l| l == &format!("aoai-sim instance sim-{i} listening on {url}")),
            "{:?}",
            sim.lines
        );
        let r = send(
            Method::POST,
            &chat_url(&url, "d"),
            &[("api-key", "k9")],
            chat_body("x").to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("x-aoai-sim-instance"),
            Some(format!("sim-{i}").as_str())
        );
        let r = post_json(&chat_url(&url, "d"), chat_body("x")).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "default key must not work"
        );
    }
    // Admin routes are off unless asked for.
    let r = send(
        Method::GET,
        &format!("http://127.0.0.1:{base}/_sim/journal"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // SIGTERM ends it cleanly.
    let pid = sim.child.id().to_string();
    // The shell's builtin kill: no dependency on a kill binary being installed.
    let st = Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(st.success());
    let status = wait_exit(&mut sim.child);
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn config_file_sets_everything_per_instance() {
    let base = free_base(2);
    let dir = std::env::temp_dir().join(format!("aoai-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("ok-{base}.json"));
    std::fs::write(
        &path,
        json!([
            {"name": "east", "region": "East US 2", "deployments": ["gpt-4o"], "reply_tokens": 2},
            {"name": "west", "api_key": "other", "faults": [{"kind": "fail", "count": 1, "status": 503}]}
        ])
        .to_string(),
    )
    .unwrap();
    let b = base.to_string();
    let _sim = spawn(
        &[
            "--config",
            path.to_str().unwrap(),
            "--base-port",
            &b,
            "--admin",
        ],
        2,
    );
    let east = format!("http://127.0.0.1:{base}");
    let west = format!("http://127.0.0.1:{}", base + 1);
    let r = post_json(&chat_url(&east, "gpt-4o"), chat_body("x")).await;
    assert_eq!(r.header("x-ms-region"), Some("East US 2"));
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    let r = post_json(&chat_url(&east, "nope"), chat_body("x")).await;
    assert_eq!(r.json()["error"]["code"], "DeploymentNotFound");
    let send_west = || async {
        send(
            Method::POST,
            &chat_url(&west, "d"),
            &[("api-key", "other")],
            chat_body("x").to_string(),
        )
        .await
    };
    assert_eq!(send_west().await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(send_west().await.status, StatusCode::OK);
    // Admin routes: journal, faults.
    let j = send(Method::GET, &format!("{west}/_sim/journal"), &[], "")
        .await
        .json();
    assert_eq!(j["request_count"], 2);
    assert_eq!(j["entries"][0]["status"], 503);
    assert_eq!(j["entries"][0]["outcome"], "faulted");
    let r = send(
        Method::POST,
        &format!("{west}/_sim/faults"),
        &[],
        r#"{"kind":"fail","count":1,"status":429,"retry_after_ms":2500}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = send_west().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after-ms"), Some("2500"));
    assert_eq!(r.header("retry-after"), Some("3"));
    let r = send(
        Method::POST,
        &format!("{west}/_sim/faults"),
        &[],
        r#"{"kind":"hang","count":"x"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text().contains("count"));
    send(
        Method::POST,
        &format!("{west}/_sim/faults"),
        &[],
        r#"{"kind":"fail","status":500}"#,
    )
    .await;
    assert_eq!(send_west().await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        send(Method::DELETE, &format!("{west}/_sim/faults"), &[], "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(send_west().await.status, StatusCode::OK);
    assert_eq!(
        send(Method::DELETE, &format!("{west}/_sim/journal"), &[], "")
            .await
            .status,
        StatusCode::OK
    );
    let j = send(Method::GET, &format!("{west}/_sim/journal"), &[], "")
        .await
        .json();
    assert_eq!(j["request_count"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_config_exits_non_zero_with_one_line_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("aoai-sim-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            json!([{"name": "a"}, {"latency": {"ttft_ms": "slow"}}]).to_string(),
            "[1].latency.ttft_ms",
        ),
        (json!([{"nmae": "a"}]).to_string(), "nmae"),
        (
            json!([{"faults": [{"kind": "fail", "count": 1}]}]).to_string(),
            "[0].faults[0]",
        ),
        ("not json".to_owned(), "config file"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.json"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["--config", path.to_str().unwrap(), "--base-port", "1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err} should name {needle}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_instances_is_refused() {
    let out = Command::new(BIN)
        .args(["--instances", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--instances"));
}

#[test]
fn port_in_use_exits_non_zero_without_a_panic() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let out = Command::new(BIN)
        .args(["--instances", "1", "--base-port", &port])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot listen"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
