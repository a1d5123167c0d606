//! The gateway's integration tests, compiled into ONE test binary (`it`).
//!
//! Where new tests go: a new file `tests/it/<area>.rs`, declared below as
//! `mod <area>;` (keep the list sorted), or a new test in an existing file.
//! Never a file directly under `tests/`: cargo would build it as a binary of
//! its own, linking the whole crate and its dependencies once more (that is
//! what this layout removes), and a file under `tests/it/` that is not
//! declared here is never compiled, so its tests would silently not run.
//! `every_test_file_is_a_module_of_the_one_test_binary` below fails in both
//! cases, for this crate and for aoai-sim.
//!
//! Run one file or one test: `cargo test -p aoai-lb --test it -- proxy_basic::`
//! or `... --test it -- proxy_basic::rejects_client_key_in_query --exact`.
//!
//! Every module shares this process with the others, and tests run in
//! parallel: a test may not set environment variables, and a test that
//! reads process-wide state (the metrics recorder's exact counts, open
//! descriptors, RSS, thread counts) runs in a process of its own through
//! [`common::alone`]. Shared helpers live in `common/`; add to them rather
//! than copying a helper into a second file.

// A failed helper or check is a failed test: panicking with a message is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod backend_entra;
mod cli_config;
mod cli_logs;
mod client_entra;
mod clients_binary;
mod clients_limits;
mod common;
mod config_reload;
mod hostile_input;
mod otel_traces;
mod proxy_access_log;
mod proxy_affinity;
mod proxy_basic;
mod proxy_credentials;
mod proxy_failover;
mod proxy_metrics;
mod proxy_query;
mod proxy_realtime;
mod proxy_stream;
mod reliability_faults;
mod reliability_instance_loss;
mod reliability_soak;
mod secrets_binary;
mod server_admin;
mod server_health;
mod server_limits;
mod server_shutdown;
mod server_smuggling;
mod server_status;
mod shared_redis;
mod shared_redis_cluster;
mod steer_routing;
mod upstream_client;
mod usage_accounting;

/// Cargo compiles only the modules a test binary's main.rs declares, and
/// builds every `.rs` file directly under `tests/` as a binary of its own.
/// So, for each crate of the workspace: no `.rs` file directly under
/// `tests/`, and every `.rs` file (or directory) under `tests/it/` declared
/// as a module in `tests/it/main.rs`.
#[test]
fn every_test_file_is_a_module_of_the_one_test_binary() {
    use std::path::Path;

    let crates = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/");
    let mut problems = Vec::new();
    let mut checked = 0;
    for krate in std::fs::read_dir(crates).expect("read crates/").flatten() {
        let tests = krate.path().join("tests");
        let Ok(entries) = std::fs::read_dir(&tests) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rs") {
                problems.push(format!(
                    "{}: move it to tests/it/ and declare it in tests/it/main.rs",
                    p.display()
                ));
            }
        }
        let it = tests.join("it");
        let Ok(main) = std::fs::read_to_string(it.join("main.rs")) else {
            continue;
        };
        let declared: Vec<&str> = main
            .lines()
            .filter_map(|l| l.trim().strip_prefix("mod ")?.strip_suffix(';'))
            .collect();
        for e in std::fs::read_dir(&it).expect("read tests/it").flatten() {
            let p = e.path();
            let name = if p.is_dir() {
                e.file_name().to_string_lossy().into_owned()
            } else if p.extension().is_some_and(|x| x == "rs") {
                p.file_stem().unwrap().to_string_lossy().into_owned()
            } else {
                continue;
            };
            if name == "main" {
                continue;
            }
            checked += 1;
            if !declared.contains(&name.as_str()) {
                problems.push(format!(
                    "{}: not declared in {} (add `mod {name};`), so it never runs",
                    p.display(),
                    it.join("main.rs").display()
                ));
            }
        }
    }
    assert!(checked > 30, "found only {checked} test modules");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
