#!/usr/bin/env bash
# Runs every test of the project: formatting, lints, the Rust unit and
# integration tests, the official-SDK suite through the real gateway, the
# admin status page in a headless browser, the supply-chain policy and a
# time-boxed run of every fuzz target.
# Usage: scripts/test.sh          (FUZZ_SECONDS=N sets the time per fuzz target, default 15)
# The long soak is separate: scripts/soak.sh (see RELIABILITY.md).
#
# Three steps that need no build of the workspace (the supply-chain check,
# the template check, and installing cargo-fuzz plus building the fuzz
# targets) start at once in the background at the lowest CPU priority: on a
# fresh machine they are mostly downloads and compiling tools, which then
# fill the CPU the test steps leave idle instead of adding to the wall time.
# Their output is shown, in order, when the foreground steps are done.
#
# The official-SDK suite and the Rust tests spend most of their time waiting
# (on timeouts, on streams, on the SDK suite's one-minute rate window), not
# computing, so once the workspace is built the SDK suite runs beside
# `cargo test` (at normal priority), and the Rust test binaries run eight
# tests at a time (RUST_TEST_THREADS overrides) instead of one per core.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's wall time, printed together at the end.
timings=()
step_title=""
step_start=$SECONDS
end_step() {
  if [ -n "$step_title" ]; then
    timings+=("$(printf '%5d s  %s' $((SECONDS - step_start)) "$step_title")")
  fi
  step_title=""
}
step() {
  end_step
  step_title="$*"
  step_start=$SECONDS
  printf '\n==> %s\n' "$*"
}

logs="$(mktemp -d)"
declare -A bg_pid=()
cleanup() {
  for pid in "${bg_pid[@]}"; do
    # Each background step leads its own process group (setsid): stop all of it.
    kill -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$logs"
}
trap cleanup EXIT

# background NICENESS NAME COMMAND...
background() {
  local niceness=$1 name=$2
  shift 2
  # The step times itself: it runs beside the others from the start.
  setsid nice -n "$niceness" bash -c 'start=$SECONDS; rc=0; "$@" || rc=$?
    echo "==> (in the background: $((SECONDS - start)) s)"; exit "$rc"' _ "$@" \
    >"$logs/$name.log" 2>&1 &
  bg_pid[$name]=$!
}

# Waits for a background step and shows its output; fails like a foreground
# step would.
finish() {
  local name=$1 title=$2 rc=0
  step "$title"
  wait "${bg_pid[$name]}" || rc=$?
  unset 'bg_pid[$name]'
  cat "$logs/$name.log"
  if [ "$rc" -ne 0 ]; then
    echo "==> FAILED: $title (exit $rc)"
    exit "$rc"
  fi
}

step "cargo fmt --check"
cargo fmt --all -- --check

background 19 deploy scripts/check-deploy.sh
background 19 deny scripts/deny.sh
background 19 fuzz-build scripts/fuzz.sh --build-only

# Lints and the test build in one compilation. `cargo clippy` is `cargo check`
# with clippy-driver as the wrapper of the workspace's own crates; running the
# test build with that same wrapper lints every target while it compiles it,
# instead of compiling every dependency a second time in check mode (which
# was a third of a fresh run). The wrapper stays set for the steps that build
# the same targets again (the SDK suite, the status page), so they reuse this
# build; the fuzz steps build their own targets without it.
# CLIPPY_SEPARATE=1 runs `cargo clippy` as its own step instead.
clippy_driver="$(rustc --print sysroot)/bin/clippy-driver"
if [ "${CLIPPY_SEPARATE:-0}" != 1 ] && [ -x "$clippy_driver" ]; then
  export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
  export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
  step "cargo clippy (warnings are errors) while building every target and test binary"
  cargo test --workspace --all-targets --no-run
else
  step "cargo clippy (all targets, warnings are errors)"
  cargo clippy --workspace --all-targets -- -D warnings

  step "cargo test: build the test binaries (and the binaries the SDK suite runs)"
  cargo test --workspace --all-targets --no-run
fi

background 0 sdk sdk-tests/run.sh

step "cargo test (unit and integration tests)"
RUST_TEST_THREADS="${RUST_TEST_THREADS:-8}" cargo test --workspace

finish sdk "official SDK suite through the gateway (ran beside cargo test)"

step "status page: JS logic (node --test) and the page in headless Chromium"
crates/aoai-lb/tests/status-page/run.sh

finish deploy "Azure deployment template: offline parse and validation (deploy/)"
finish deny "supply chain: cargo-deny (offline: bans, licenses, sources)"
finish fuzz-build "fuzzing: install cargo-fuzz and build every target"

step "fuzzing: every target, time-boxed"
env -u RUSTC_WORKSPACE_WRAPPER -u CLIPPY_ARGS scripts/fuzz.sh "${FUZZ_SECONDS:-15}"

end_step
printf '\n==> wall time per step (a background step: the wait for it)\n'
printf '%s\n' "${timings[@]}"
printf '\n==> every step passed in %d min %d s\n' $((SECONDS / 60)) $((SECONDS % 60))
