#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a fixed time box and fails on the first
# crash, panic, timeout or out-of-memory. The committed corpus
# (fuzz/corpus/<target>) seeds each run and is never written to: new inputs
# go to a scratch directory. A crashing input is saved under
# fuzz/artifacts/<target>/ and printed.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#        scripts/fuzz.sh --build-only   install cargo-fuzz and build every
#                                       target, run nothing (scripts/test.sh
#                                       does this in the background early)
#   SECONDS_PER_TARGET defaults to 20.
#   FUZZ_SANITIZER=address  builds with AddressSanitizer (default: none; the
#                           project forbids unsafe code, so the fuzzers look
#                           for panics, overflows, hangs and runaway memory).
#   FUZZ_TOOLCHAIN=nightly  the toolchain for cargo fuzz; when it is not
#                           installed, the stable one is used with
#                           RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.1
BUILD_ONLY=0
if [ "${1:-}" = "--build-only" ]; then
  BUILD_ONLY=1
  shift
fi
SECS="${1:-20}"
shift || true
SANITIZER="${FUZZ_SANITIZER:-none}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"

installed="$(cargo fuzz --version 2>/dev/null || true)"
if [ "${installed#cargo-fuzz }" != "$CARGO_FUZZ_VERSION" ]; then
  echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION"
  # Unoptimised: cargo-fuzz only drives cargo, so its own speed is irrelevant
  # and the debug build compiles several times faster on a fresh machine.
  cargo install --locked --debug "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

if rustup toolchain list 2>/dev/null | grep -q "^$TOOLCHAIN"; then
  fuzz() { cargo "+$TOOLCHAIN" fuzz "$@"; }
else
  echo "==> toolchain $TOOLCHAIN not installed; using the default one with RUSTC_BOOTSTRAP=1"
  fuzz() { RUSTC_BOOTSTRAP=1 cargo fuzz "$@"; }
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^aoai-lb-fuzz$')
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

echo "==> building ${#targets[@]} fuzz targets (sanitizer: $SANITIZER)"
fuzz build --sanitizer "$SANITIZER" --debug-assertions
if [ "$BUILD_ONLY" = 1 ]; then
  exit 0
fi

# One target: its outcome goes to $scratch/<target>.result, its log stays
# in $scratch/<target>.log.
fuzz_one() {
  local t=$1 log="$scratch/$1.log"
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  if fuzz run --sanitizer "$SANITIZER" --debug-assertions "$t" \
      "$scratch/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 >"$log" 2>&1; then
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    echo "ok, ${execs:-?} executions in ${SECS}s" >"$scratch/$t.result"
  else
    echo "FAILED" >"$scratch/$t.result"
  fi
}

# Each fuzzer is single-threaded, so as many run at once as there are CPUs
# (FUZZ_JOBS overrides): the time box per target is unchanged, the wall time
# of the whole step shrinks.
jobs_max="${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}"
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs_max" ]; then
    wait -n || true
    running=$((running - 1))
  fi
  echo "==> fuzzing $t for ${SECS}s"
  fuzz_one "$t" &
  running=$((running + 1))
done
wait

failed=0
summary=()
for t in "${targets[@]}"; do
  result="$(cat "$scratch/$t.result" 2>/dev/null || echo FAILED)"
  summary+=("$t: $result")
  if [ "$result" = FAILED ]; then
    failed=1
    log="$scratch/$t.log"
    echo "---- $t failed ----"
    grep -m1 -A2 'panicked at' "$log" || true
    grep -A3 'Failing input' "$log" || tail -20 "$log"
  fi
done

echo
echo "==> fuzz summary"
printf '  %s\n' "${summary[@]}"
exit "$failed"
