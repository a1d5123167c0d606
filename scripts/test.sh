#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust unit and
# integration tests, the official-SDK suite through the real gateway, the
# admin status page in a headless browser, the supply-chain policy and a
# time-boxed run of every fuzz target.
# Usage: scripts/test.sh          (FUZZ_SECONDS=N sets the time per fuzz target, default 15)
# The long soak is separate: scripts/soak.sh (see RELIABILITY.md).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit and integration tests)"
cargo test --workspace

step "official SDK suite through the gateway"
sdk-tests/run.sh

step "status page: JS logic (node --test) and the page in headless Chromium"
crates/aoai-lb/tests/status-page/run.sh

step "Azure deployment template: offline parse and validation (deploy/)"
scripts/check-deploy.sh

step "supply chain: cargo-deny (offline: bans, licenses, sources)"
scripts/deny.sh

step "fuzzing: every target, time-boxed"
scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
