//! Start-up through the real binary: configuration sources, validation
//! errors, the client-key rule and flag/env precedence.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};

/// A backend key that must never appear in any output.
const SECRET: &str = "sk-live-DO-NOT-PRINT-7f3a9c";
const EXIT_WAIT: Duration = Duration::from_secs(20);
const START_WAIT: Duration = Duration::from_secs(20);

fn good_doc(url: &str) -> String {
    format!(r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}"}}]}}"#)
}

/// Runs the binary with `OPENAI_INSTANCES=doc` and asserts a clean refusal:
/// exit code 1, exactly one line, `expect` in it, no secret, no panic.
fn assert_refused(env: &[(&str, &str)], args: &[&str], expect: &[&str]) -> String {
    let (status, lines) = run_binary(args, env, EXIT_WAIT);
    assert_eq!(status.code(), Some(1), "exit code; output: {lines:#?}");
    assert_eq!(lines.len(), 1, "exactly one line: {lines:#?}");
    let line = &lines[0].1;
    for e in expect {
        assert!(line.contains(e), "{e:?} not in {line}");
    }
    assert!(!line.contains(SECRET), "secret echoed: {line}");
    assert!(!line.contains("panicked"), "{line}");
    assert!(!line.contains("backtrace"), "{line}");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["level"], "ERROR", "{line}");
    line.clone()
}

#[test]
fn exits_naming_the_field_for_each_bad_document() {
    let url = "https://a.example.com";
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!(
                r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}","wieght":2}}]}}"#
            ),
            &["instances[0]", "wieght"],
        ),
        (
            format!(r#"{{"instances":[{{"name":"a","api_key":"{SECRET}"}}]}}"#),
            &["instances[0]", "url"],
        ),
        (
            format!(r#"{{"instances":[{{"name":"a","url":"{url}"}}]}}"#),
            &["instances[0]", "api_key"],
        ),
        (
            format!(
                r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}"}},{{"name":"b","url":"not a url","api_key":"{SECRET}"}}]}}"#
            ),
            &["instances[1].url"],
        ),
        (
            format!(
                r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}"}},{{"name":"a","url":"{url}","api_key":"{SECRET}"}}]}}"#
            ),
            &["instances[1].name", "duplicate"],
        ),
        (
            format!(
                r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}","weight":0}}]}}"#
            ),
            &["instances[0].weight"],
        ),
        (
            format!(
                r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}","weight":-2.5}}]}}"#
            ),
            &["instances[0].weight"],
        ),
        (r#"{"instances":[]}"#.to_owned(), &["instances"]),
        (
            format!(
                r#"{{"instances":[{{"name":"a","url":"{url}","api_key":{{"k":"{SECRET}"}}}}]}}"#
            ),
            &["instances[0].api_key"],
        ),
    ];
    for (doc, expect) in cases {
        let line = assert_refused(
            &[("OPENAI_INSTANCES", &doc), ("API_KEY", CLIENT_KEY)],
            &[],
            expect,
        );
        assert!(line.contains("invalid configuration"), "{line}");
    }
}

#[test]
fn says_that_openai_instances_is_not_valid_json_and_where() {
    let url = "https://a.example.com";
    // Truncated: the closing `]}` is missing.
    let doc = format!(r#"{{"instances":[{{"name":"a","url":"{url}","api_key":"{SECRET}"}}"#);
    let line = assert_refused(
        &[("OPENAI_INSTANCES", &doc), ("API_KEY", CLIENT_KEY)],
        &[],
        &[
            "OPENAI_INSTANCES is not valid JSON: EOF while parsing",
            "at line 1 column",
        ],
    );
    assert!(!line.contains("invalid configuration"), "{line}");
}

#[test]
fn says_which_file_is_not_valid_json_and_where() {
    let dir = std::env::temp_dir().join(format!("aoai-lb-notjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("instances.json");
    // A trailing comma on line 3.
    std::fs::write(
        &path,
        format!(
            "{{\n  \"instances\": [\n    {{\"name\": \"a\", \"api_key\": \"{SECRET}\",}}\n  ]\n}}\n"
        ),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    assert_refused(
        &[("API_KEY", CLIENT_KEY)],
        &["--config", p],
        &[
            &format!("configuration file {p} is not valid JSON: "),
            "line 3 column",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reads_a_bad_document_from_a_file_too() {
    let dir = std::env::temp_dir().join(format!("aoai-lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.json");
    std::fs::write(
        &path,
        format!(r#"{{"instances":[{{"name":"a","url":"ftp://x","api_key":"{SECRET}"}}]}}"#),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    assert_refused(
        &[("API_KEY", CLIENT_KEY)],
        &["--config", p],
        &["instances[0].url"],
    );
    assert_refused(
        &[("API_KEY", CLIENT_KEY), ("OPENAI_CONFIG_PATH", p)],
        &[],
        &["instances[0].url"],
    );
    let missing = dir.join("missing.json");
    assert_refused(
        &[("API_KEY", CLIENT_KEY)],
        &["--config", missing.to_str().unwrap()],
        &["cannot read configuration file", "missing.json"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_to_start_without_any_configuration() {
    assert_refused(
        &[("API_KEY", CLIENT_KEY)],
        &[],
        &["no configuration", "OPENAI_INSTANCES", "OPENAI_CONFIG_PATH"],
    );
}

#[test]
fn refuses_to_start_without_api_key_and_says_how_to_set_it() {
    let port = free_port();
    let p = port.to_string();
    assert_refused(
        &[("OPENAI_INSTANCES", &good_doc("http://127.0.0.1:9"))],
        &["--port", &p, "--admin-port", "0"],
        &["API_KEY=", "--allow-unauthenticated"],
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing may listen"
    );
}

#[tokio::test]
async fn starts_unauthenticated_only_when_opted_out_and_warns() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    for (args, env) in [
        (vec!["--allow-unauthenticated"], vec![]),
        (vec![], vec![("ALLOW_UNAUTHENTICATED", "true")]),
    ] {
        let mut env = env;
        env.push(("OPENAI_INSTANCES", doc.as_str()));
        let mut args = args;
        args.extend(["--host", "127.0.0.1", "--port", "0", "--admin-port", "0"]);
        let mut bin = spawn_binary(&args, &env);
        let (addr, _) = bin.wait_listening(START_WAIT);
        let warn = bin
            .lines()
            .into_iter()
            .find(|(_, l)| l.contains("\"level\":\"WARN\"") && l.contains("authentication is OFF"));
        assert!(warn.is_some(), "warning logged: {:#?}", bin.lines());
        let url = format!("http://{addr}{}", chat_path("gpt-4o"));
        let (s, _, body) = send(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            chat_body(false),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body:?}");
        bin.signal("TERM");
        assert_eq!(bin.wait_exit(EXIT_WAIT).and_then(|s| s.code()), Some(0));
    }
}

#[tokio::test]
async fn flags_override_environment_variables() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let dir = std::env::temp_dir().join(format!("aoai-lb-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("good.json");
    std::fs::write(&file, &doc).unwrap();
    let (env_port, flag_port) = (free_port(), free_port());
    let (env_admin, flag_admin) = (free_port(), free_port());
    let env_port_s = env_port.to_string();
    let env_admin_s = env_admin.to_string();
    let flag_port_s = flag_port.to_string();
    let flag_admin_s = flag_admin.to_string();
    let mut bin = spawn_binary(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &flag_port_s,
            "--admin-port",
            &flag_admin_s,
            "--config",
            file.to_str().unwrap(),
        ],
        &[
            // A broken env document proves --config wins over it.
            ("OPENAI_INSTANCES", "{not json"),
            ("HOST", "0.0.0.0"),
            ("PORT", &env_port_s),
            ("ADMIN_PORT", &env_admin_s),
            ("API_KEY", CLIENT_KEY),
        ],
    );
    let (addr, admin) = bin.wait_listening(START_WAIT);
    assert_eq!(addr.to_string(), format!("127.0.0.1:{flag_port}"));
    assert_eq!(admin.to_string(), format!("127.0.0.1:{flag_admin}"));
    let (s, _, _) = send(
        Method::GET,
        &format!("http://{addr}/healthz"),
        &[] as &[(&str, &str)],
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(std::net::TcpStream::connect(("127.0.0.1", env_port)).is_err());
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(EXIT_WAIT).and_then(|s| s.code()), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reads_port_and_host_from_the_environment() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let port = free_port();
    let port_s = port.to_string();
    let mut bin = spawn_binary(
        &["--admin-port", "0"],
        &[
            ("OPENAI_INSTANCES", &doc),
            ("HOST", "127.0.0.1"),
            ("PORT", &port_s),
            ("API_KEY", CLIENT_KEY),
        ],
    );
    let (addr, _) = bin.wait_listening(START_WAIT);
    assert_eq!(addr.to_string(), format!("127.0.0.1:{port}"));
    let (s, _, body) = send(
        Method::POST,
        &format!("http://{addr}{}", chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body:?}");
    bin.signal("INT");
    assert_eq!(bin.wait_exit(EXIT_WAIT).and_then(|s| s.code()), Some(0));
}

#[tokio::test]
async fn writes_human_lines_with_log_format_text() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let mut bin = spawn_binary(
        &["--host", "127.0.0.1", "--port", "0", "--admin-port", "0"],
        &[
            ("OPENAI_INSTANCES", &doc),
            ("API_KEY", CLIENT_KEY),
            ("LOG_FORMAT", "text"),
        ],
    );
    let line = bin
        .wait_for_line(START_WAIT, |l| l.contains("listening"))
        .expect("listening line");
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "{line}"
    );
    assert!(line.contains("INFO"), "{line}");
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(EXIT_WAIT).and_then(|s| s.code()), Some(0));
}

#[tokio::test]
async fn log_level_warn_hides_info_lines() {
    let sims = sims(1).await;
    let doc = config_for(&sims);
    let port = free_port();
    let port_s = port.to_string();
    let mut bin = spawn_binary(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port_s,
            "--admin-port",
            "0",
        ],
        &[
            ("OPENAI_INSTANCES", &doc),
            ("API_KEY", CLIENT_KEY),
            ("LOG_LEVEL", "warn"),
        ],
    );
    // Nothing is logged at warn on a clean start, so wait until it answers.
    let deadline = std::time::Instant::now() + START_WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, _, _) = send(
        Method::POST,
        &format!("http://127.0.0.1:{port}{}", chat_path("gpt-4o")),
        &auth(),
        chat_body(false),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(EXIT_WAIT).and_then(|s| s.code()), Some(0));
    assert!(
        bin.lines().iter().all(|(_, l)| !l.contains("\"INFO\"")),
        "{:#?}",
        bin.lines()
    );
}

#[test]
fn exits_cleanly_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (status, lines) = run_binary(
        &["--host", "127.0.0.1", "--port", &port, "--admin-port", "0"],
        &[
            ("OPENAI_INSTANCES", &good_doc("http://127.0.0.1:9")),
            ("API_KEY", CLIENT_KEY),
        ],
        EXIT_WAIT,
    );
    assert_eq!(status.code(), Some(1), "{lines:#?}");
    let last = &lines.last().unwrap().1;
    assert!(last.contains("cannot listen on 127.0.0.1:"), "{last}");
    assert!(
        lines
            .iter()
            .all(|(_, l)| !l.contains(SECRET) && !l.contains("panicked"))
    );
}
