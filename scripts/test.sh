#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust unit and
# integration tests, and the official-SDK suite through the real gateway.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit and integration tests)"
cargo test --workspace

if [ -x sdk-tests/run.sh ]; then
  step "official SDK suite through the gateway"
  sdk-tests/run.sh
fi
