//! Hot reload of the configuration file: under load with no failed request
//! and no cut stream; new instances take traffic and removed ones drain;
//! live state carries over (instances by name and URL, clients by name);
//! bad documents are refused once each and the running configuration kept;
//! both triggers (the poll, with rename-replace and Kubernetes-style symlink
//! swaps, and SIGHUP).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};

const NONE: &[(&str, &str)] = &[];
const WAIT: Duration = Duration::from_secs(15);

/// A directory of its own under the system temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("aoai-lb-reload-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path` the way editors and config tools do: write a new file
/// beside it, then rename it over the old one.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts the gateway on the document in `path`, reading it every `poll`.
async fn start_watching(path: &Path, poll: Option<Duration>) -> TestGateway {
    let text = std::fs::read_to_string(path).unwrap();
    start_gateway_with(&text, Some(CLIENT_KEY), |o| {
        o.config_file = Some(path.to_owned());
        o.config_poll = poll;
        o.config_source = format!("file {}", path.display());
    })
    .await
}

async fn status_of(admin_url: &str) -> serde_json::Value {
    let (s, _, body) = send(Method::GET, &format!("{admin_url}/admin/status"), NONE, "").await;
    assert_eq!(s, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

/// Waits until the status document satisfies `pred`; returns it.
async fn wait_status(
    admin_url: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = status_of(admin_url).await;
        if pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_generation(admin_url: &str, generation: u64) -> serde_json::Value {
    wait_status(admin_url, &format!("generation {generation}"), |v| {
        v["config"]["generation"] == generation
    })
    .await
}

fn instance<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
}

/// The document for `sims` with per-instance `overrides` merged in order.
fn doc_for(sims: &[&aoai_sim::SimHandle], overrides: serde_json::Value) -> String {
    let owned: Vec<aoai_sim::SimHandle> = sims.iter().map(|s| (*s).clone()).collect();
    config_with(&owned, overrides)
}

fn chat_url(gw: &TestGateway) -> String {
    format!("{}{}", gw.url(), chat_path("gpt-4o"))
}

/// A stream ended cleanly: no error, and its last event is `[DONE]`.
fn assert_complete(s: &Streamed) {
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.error.is_none(), "stream cut: {:?}", s.error);
    let events = s.sse_data();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_load_with_no_failed_request_and_no_cut_stream() {
    let slow = |name: &str| {
        aoai_sim::InstanceConfig::new(format!("load-{name}"))
            .latency(5, 8)
            .reply_tokens(30)
    };
    let sims = start_sims(vec![slow("a"), slow("b"), slow("c")]).await;
    let (a, b, c) = (&sims[0], &sims[1], &sims[2]);
    let dir = Dir::new("load");
    let path = dir.0.join("instances.json");
    std::fs::write(&path, doc_for(&[a, b], serde_json::json!({}))).unwrap();
    let gw = start_watching(&path, Some(Duration::from_millis(50))).await;
    let url = chat_url(&gw);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (url, stop, done) = (url.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Bounded in count and time.
            let deadline = Instant::now() + Duration::from_secs(20);
            for i in 0..400 {
                if stop.load(Ordering::Acquire) || Instant::now() > deadline {
                    break;
                }
                if (w + i) % 2 == 0 {
                    let s = send_stream(Method::POST, &url, &auth(), chat_body(true)).await;
                    if s.status != StatusCode::OK
                        || s.error.is_some()
                        || s.sse_data().last().map(String::as_str) != Some("[DONE]")
                    {
                        failures.push(format!("stream: {} {:?}", s.status, s.error));
                    }
                } else {
                    let (st, _, body) = send(Method::POST, &url, &auth(), chat_body(false)).await;
                    if st != StatusCode::OK {
                        failures.push(format!("{st}: {}", String::from_utf8_lossy(&body)));
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }

    // Four reloads while the load runs: add an instance, change weights and
    // priorities, remove one that is serving streams, bring it back.
    let steps = [
        doc_for(
            &[a, b, c],
            serde_json::json!({"instances": [{"weight": 3.0}]}),
        ),
        doc_for(
            &[b, c],
            serde_json::json!({"instances": [{"priority": 1}, {"priority": 2}]}),
        ),
        doc_for(&[c, a], serde_json::json!({})),
        doc_for(
            &[a, b, c],
            serde_json::json!({"timeouts": {"stream_idle_ms": 60000}}),
        ),
    ];
    for (i, text) in steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        replace_file(&path, text);
        wait_generation(&gw.admin_url(), i as u64 + 2).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Release);
    let mut failures = Vec::new();
    for w in workers {
        failures.extend(w.await.unwrap());
    }
    let total = done.load(Ordering::Relaxed);
    eprintln!(
        "reload under load: {total} requests (half streamed) across {} reloads",
        steps.len()
    );
    assert!(total >= 30, "only {total} requests ran");
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}",
        failures.len()
    );
    assert!(c.request_count() > 0, "the added instance took traffic");
}

#[tokio::test]
async fn a_new_instance_takes_traffic_and_a_removed_one_drains() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("drain-old")
            .latency(10, 40)
            .reply_tokens(30),
        aoai_sim::InstanceConfig::new("drain-new"),
    ])
    .await;
    let (old, new) = (&sims[0], &sims[1]);
    let dir = Dir::new("drain");
    let path = dir.0.join("instances.json");
    std::fs::write(&path, doc_for(&[old], serde_json::json!({}))).unwrap();
    let gw = start_watching(&path, Some(Duration::from_millis(50))).await;
    let url = chat_url(&gw);

    // A stream of about 1.2 s on the instance about to be removed.
    let stream = {
        let url = url.clone();
        tokio::spawn(async move { send_stream(Method::POST, &url, &auth(), chat_body(true)).await })
    };
    let deadline = Instant::now() + WAIT;
    while old.request_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the stream never reached the instance"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    replace_file(&path, &doc_for(&[new], serde_json::json!({})));
    let v = wait_generation(&gw.admin_url(), 2).await;
    let leaving = instance(&v, "drain-old").expect("listed while it drains");
    assert_eq!(leaving["state"], "draining");
    assert_eq!(leaving["in_flight"], 1);
    assert_eq!(instance(&v, "drain-new").unwrap()["state"], "ok");

    for _ in 0..5 {
        let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
        assert_eq!(s, StatusCode::OK);
    }
    assert_eq!(
        new.request_count(),
        5,
        "every new request goes to the new instance"
    );
    assert_eq!(old.request_count(), 1, "none to the removed one");

    let s = stream.await.unwrap();
    assert_complete(&s);
    assert!(
        s.chunks.len() > 10,
        "the stream was long: {}",
        s.chunks.len()
    );
    let v = status_of(&gw.admin_url()).await;
    assert!(
        instance(&v, "drain-old").is_none(),
        "gone once drained: {v}"
    );
}

#[tokio::test]
async fn cooldown_and_activity_carry_over_when_name_and_url_are_unchanged() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("carry-a").fault(aoai_sim::Fault::Fail {
            count: Some(1),
            status: 429,
            body: None,
            retry_after_ms: Some(60_000),
        }),
        aoai_sim::InstanceConfig::new("carry-b"),
    ])
    .await;
    let (a, b) = (&sims[0], &sims[1]);
    let dir = Dir::new("carry");
    let path = dir.0.join("instances.json");
    std::fs::write(
        &path,
        doc_for(
            &[a, b],
            serde_json::json!({"instances": [{"priority": 1}, {"priority": 2}]}),
        ),
    )
    .unwrap();
    let gw = start_watching(&path, Some(Duration::from_millis(50))).await;
    let url = chat_url(&gw);
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(a.request_count(), 1);

    // New weight and a new instance; `carry-a` keeps its name and URL.
    let c = start_sims(vec![aoai_sim::InstanceConfig::new("carry-c")]).await;
    replace_file(
        &path,
        &doc_for(
            &[a, b, &c[0]],
            serde_json::json!({"instances": [{"priority": 1, "weight": 5.0}, {"priority": 2}, {"priority": 3}]}),
        ),
    );
    let v = wait_generation(&gw.admin_url(), 2).await;
    let ia = instance(&v, "carry-a").unwrap();
    assert_eq!(ia["state"], "cooling", "{v}");
    assert_eq!(ia["weight"], 5.0);
    assert!(ia["cooldown_remaining_ms"].as_u64().unwrap() > 50_000);
    assert_eq!(ia["last_throttle"]["status"], 429);
    let throttled: u64 = ia["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[1].as_u64().unwrap())
        .sum();
    assert_eq!(throttled, 1);
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(a.request_count(), 1, "still cooling: skipped");
    assert_eq!(b.request_count(), 2);

    // The same name with another URL is another instance: fresh state.
    replace_file(
        &path,
        &serde_json::json!({"instances": [
            {"name": "carry-a", "url": c[0].url(), "api_key": c[0].config().api_key, "priority": 1},
            {"name": "carry-b", "url": b.url(), "api_key": b.config().api_key, "priority": 2}
        ]})
        .to_string(),
    );
    let v = wait_generation(&gw.admin_url(), 3).await;
    assert_eq!(instance(&v, "carry-a").unwrap()["state"], "ok", "{v}");
}

#[tokio::test]
async fn a_bad_document_is_refused_and_the_running_one_kept() {
    let sims = sims(1).await;
    let dir = Dir::new("bad");
    let path = dir.0.join("instances.json");
    let good = config_for(&sims);
    std::fs::write(&path, &good).unwrap();
    let gw = start_watching(&path, Some(Duration::from_millis(30))).await;
    let url = chat_url(&gw);

    // Truncated JSON.
    replace_file(&path, &good[..good.len() - 2]);
    let v = wait_status(&gw.admin_url(), "a rejected reload", |v| {
        v["config"]["last_reload"]["outcome"] == "rejected"
    })
    .await;
    let err = v["config"]["last_reload"]["error"].as_str().unwrap();
    assert!(
        err.starts_with(&format!(
            "configuration file {} is not valid JSON: ",
            path.display()
        )),
        "{err}"
    );
    assert!(err.contains("at line 1 column"), "{err}");
    assert_eq!(v["config"]["generation"], 1);
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "still served on the running configuration"
    );

    // Valid JSON, wrong field: named.
    let bad_url = good.replace(&sims[0].url(), "ftp://example");
    replace_file(&path, &bad_url);
    let v = wait_status(&gw.admin_url(), "the field named", |v| {
        v["config"]["last_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("instances[0].url"))
    })
    .await;
    assert_eq!(v["config"]["generation"], 1);
    let (s, _, _) = send(Method::POST, &url, &auth(), chat_body(false)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(sims[0].request_count(), 2);

    // Fixed: applied.
    replace_file(
        &path,
        &config_with(&sims, serde_json::json!({"instances": [{"weight": 2.0}]})),
    );
    let v = wait_generation(&gw.admin_url(), 2).await;
    assert_eq!(v["config"]["last_reload"]["outcome"], "applied");
    assert!(v["config"]["last_reload"].get("error").is_none());
}

#[tokio::test]
async fn the_poll_sees_a_kubernetes_style_symlink_swap() {
    let sims = start_sims(vec![
        aoai_sim::InstanceConfig::new("k8s-a"),
        aoai_sim::InstanceConfig::new("k8s-b"),
    ])
    .await;
    let dir = Dir::new("k8s");
    // The layout a ConfigMap volume has: instances.json -> ..data/instances.json,
    // ..data -> ..<timestamp>; an update swaps ..data in one rename.
    let v1 = dir.0.join("..2026_11_29_v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("instances.json"), config_for(&sims[..1])).unwrap();
    std::os::unix::fs::symlink("..2026_11_29_v1", dir.0.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/instances.json", dir.0.join("instances.json")).unwrap();
    let path = dir.0.join("instances.json");
    let gw = start_watching(&path, Some(Duration::from_millis(50))).await;

    let v2 = dir.0.join("..2026_11_29_v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("instances.json"), config_for(&sims)).unwrap();
    std::os::unix::fs::symlink("..2026_11_29_v2", dir.0.join("..data_tmp")).unwrap();
    std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();

    let v = wait_generation(&gw.admin_url(), 2).await;
    assert!(instance(&v, "k8s-b").is_some(), "{v}");
    assert_eq!(v["config"]["last_reload"]["trigger"], "poll");
}

/// Error lines about a rejected reload in `bin`'s output.
fn rejected_lines(bin: &Binary) -> Vec<String> {
    bin.all_text()
        .into_iter()
        .filter(|l| l.contains("configuration reload rejected"))
        .collect()
}

#[tokio::test]
async fn sighup_reloads_and_each_bad_document_is_reported_once() {
    let sims = sims(2).await;
    let dir = Dir::new("sighup");
    let path = dir.0.join("instances.json");
    std::fs::write(&path, config_for(&sims[..1])).unwrap();
    let p = path.to_str().unwrap();
    // No poll: only SIGHUP reloads.
    let bin = spawn_binary(
        &[
            "--config",
            p,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-port",
            "0",
        ],
        &[("API_KEY", CLIENT_KEY), ("CONFIG_POLL_MS", "0")],
    );
    let (_, admin) = bin.wait_listening(WAIT);
    let admin_url = format!("http://{admin}");

    let mut next: serde_json::Value = serde_json::from_str(&config_for(&sims)).unwrap();
    next["server"] = serde_json::json!({"max_connections": 5});
    replace_file(&path, &next.to_string());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        status_of(&admin_url).await["config"]["generation"],
        1,
        "no poll"
    );
    bin.signal("HUP");
    let v = wait_generation(&admin_url, 2).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 2);
    assert_eq!(v["config"]["last_reload"]["trigger"], "SIGHUP");
    assert_eq!(
        v["config"]["last_reload"]["restart_needed"],
        serde_json::json!(["server.max_connections"])
    );
    let restart = bin
        .wait_for_line(WAIT, |l| l.contains("cannot change while the process runs"))
        .expect("a line about the restart");
    assert!(restart.contains("server.max_connections"), "{restart}");
    assert!(restart.contains("\"level\":\"WARN\""), "{restart}");
    assert!(
        bin.wait_for_message(WAIT, "configuration reloaded")
            .is_some()
    );

    // A bad document: one error line, however often it is read again.
    replace_file(&path, "{\"instances\": [");
    bin.signal("HUP");
    bin.wait_for_line(WAIT, |l| l.contains("configuration reload rejected"))
        .expect("rejected");
    bin.signal("HUP");
    bin.wait_for_line(WAIT, |l| {
        l.contains("still holds the document rejected before")
    })
    .expect("a reminder, not a second error");
    let lines = rejected_lines(&bin);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("is not valid JSON"), "{}", lines[0]);
    assert!(lines[0].contains("keeping generation 2"), "{}", lines[0]);
    // Another bad document is another line.
    replace_file(&path, "{\"instances\": []}");
    bin.signal("HUP");
    let deadline = Instant::now() + WAIT;
    while rejected_lines(&bin).len() < 2 {
        assert!(Instant::now() < deadline, "{:#?}", bin.all_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rejected_lines(&bin)[1].contains("instances: at least one instance"));
    assert_eq!(status_of(&admin_url).await["config"]["generation"], 2);
    for l in bin.all_text() {
        assert!(
            !l.contains(&sims[0].config().api_key),
            "a key in the logs: {l}"
        );
    }
}

#[tokio::test]
async fn the_poll_reports_a_bad_document_once() {
    let sims = sims(1).await;
    let dir = Dir::new("poll-once");
    let path = dir.0.join("instances.json");
    std::fs::write(&path, config_for(&sims)).unwrap();
    let p = path.to_str().unwrap();
    let bin = spawn_binary(
        &[
            "--config",
            p,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-port",
            "0",
        ],
        &[("API_KEY", CLIENT_KEY), ("CONFIG_POLL_MS", "20")],
    );
    let (_, admin) = bin.wait_listening(WAIT);
    replace_file(&path, "{\"instances\": [{\"name\": \"a\",}]}");
    bin.wait_for_line(WAIT, |l| l.contains("configuration reload rejected"))
        .expect("rejected");
    // Twenty-odd more reads of the same bytes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = rejected_lines(&bin);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("line 1 column"), "{}", lines[0]);
    let (_, _, body) = send(Method::GET, &format!("http://{admin}/metrics"), NONE, "").await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(r#"aoai_lb_config_reloads_total{outcome="rejected"} 1"#),
        "{text}"
    );
    assert!(text.contains("aoai_lb_config_generation 1"), "{text}");
    assert!(text.contains("aoai_lb_config_info{hash=\""), "{text}");
}

#[tokio::test]
async fn sighup_with_the_document_in_the_environment_says_it_cannot_change() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let mut bin = spawn_binary(
        &["--host", "127.0.0.1", "--port", "0", "--admin-port", "0"],
        &[("API_KEY", CLIENT_KEY), ("OPENAI_INSTANCES", &doc)],
    );
    let (addr, _) = bin.wait_listening(WAIT);
    bin.signal("HUP");
    let line = bin
        .wait_for_line(WAIT, |l| l.contains("nothing to reload"))
        .expect("a line saying why");
    assert!(line.contains("OPENAI_INSTANCES"), "{line}");
    // Still serving.
    let (s, _, _) = send(
        Method::POST,
        &format!("http://{addr}{}", chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(WAIT).and_then(|s| s.code()), Some(0));
}

#[tokio::test]
async fn a_client_keeps_its_window_use_across_a_reload() {
    let sims = sims(2).await;
    let dir = Dir::new("client-window");
    let path = dir.0.join("instances.json");
    let clients =
        serde_json::json!([{"name": "reload-team", "key": "reload-team-key-5c1", "rpm": 2}]);
    std::fs::write(
        &path,
        config_with(&sims[..1], serde_json::json!({ "clients": clients })),
    )
    .unwrap();
    let gw = start_watching(&path, Some(Duration::from_millis(50))).await;
    let url = chat_url(&gw);
    let team = [
        ("api-key", "reload-team-key-5c1"),
        ("content-type", "application/json"),
    ];
    for _ in 0..2 {
        let (s, _, _) = send(Method::POST, &url, &team, chat_body(false)).await;
        assert_eq!(s, StatusCode::OK);
    }
    // Another instance, same client: its minute is not reset.
    replace_file(
        &path,
        &config_with(&sims, serde_json::json!({ "clients": clients })),
    );
    let v = wait_generation(&gw.admin_url(), 2).await;
    let row = v["clients"]
        .as_array()
        .and_then(|c| c.iter().find(|r| r["name"] == "reload-team"))
        .unwrap_or_else(|| panic!("client row: {v}"));
    assert_eq!(row["requests_per_min"], 2);
    let (s, _, body) = send(Method::POST, &url, &team, chat_body(false)).await;
    assert_eq!(
        s,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let total: usize = sims.iter().map(aoai_sim::SimHandle::request_count).sum();
    assert_eq!(total, 2, "the third request never reached an instance");
}
