//! The simulator's integration tests, compiled into ONE test binary (`it`).
//!
//! Where new tests go: a new file `tests/it/<area>.rs`, declared below as
//! `mod <area>;` (keep the list sorted), or a new test in an existing file.
//! Never a file directly under `tests/`: cargo would build it as a binary of
//! its own, and a file under `tests/it/` that is not declared here is never
//! compiled. aoai-lb's `every_test_file_is_a_module_of_the_one_test_binary`
//! (crates/aoai-lb/tests/it/main.rs) checks this crate's layout too.
//!
//! Run one file: `cargo test -p aoai-sim --test it -- chat::`. Every module
//! shares this process with the others and tests run in parallel, so no
//! test may set environment variables or rely on process-wide state.

mod admission;
mod chat;
mod cli;
mod common;
mod entra;
mod faults;
mod surface;
mod usage;
