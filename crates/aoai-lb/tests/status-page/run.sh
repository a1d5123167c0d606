#!/usr/bin/env bash
# Tests of the admin status page:
#   1. its pure JS logic with node's test runner (no browser);
#   2. the page in a real headless Chromium (Debian's `chromium`, driven by
#      npm `playwright-core`, which never downloads a browser), against the
#      real gateway and simulator binaries on 127.0.0.1.
# Installs what it needs when missing, idempotently: Chromium with apt-get
# (as root) and playwright-core with `npm ci` from the lock file.
#
# Usage: crates/aoai-lb/tests/status-page/run.sh
# Env:   UPDATE_SCREENSHOT=1  save the picture as docs/status-page.png (the
#                             README's) instead of under out/
#        CHROMIUM             browser executable (default: chromium on PATH)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
say() { printf '[status-page] %s\n' "$*"; }

command -v node >/dev/null 2>&1 || { say "node is required (Node.js 20 or later)"; exit 2; }

if [ -z "${CHROMIUM:-}" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
      say "chromium is missing and this is not root: apt-get install chromium"
      exit 2
    fi
    say "installing Debian's chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
  fi
  CHROMIUM="$(command -v chromium)"
fi

lock_hash="$(sha256sum "$HERE/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$HERE/node_modules/.lock.sha256" 2>/dev/null)" != "$lock_hash" ]; then
  say "installing playwright-core (npm ci)"
  (cd "$HERE" && npm ci --silent --no-audit --no-fund)
  echo "$lock_hash" > "$HERE/node_modules/.lock.sha256"
fi

# The same target selection as `cargo test --workspace` (see sdk-tests/run.sh):
# after the test run this is a no-op, where `-p aoai-lb -p aoai-sim` resolves
# dependency features without the dev-dependencies and compiles a second set.
say "building aoai-lb and aoai-sim"
(cd "$ROOT" && cargo build -q --workspace --all-targets)
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac

SCREENSHOT="$HERE/out/status-page.png"
[ "${UPDATE_SCREENSHOT:-0}" = 1 ] && SCREENSHOT="$ROOT/docs/status-page.png"

say "node --test (logic, then the page in $("$CHROMIUM" --version 2>/dev/null | head -n1))"
cd "$HERE"
AOAI_LB_BIN="$TARGET_DIR/debug/aoai-lb" AOAI_SIM_BIN="$TARGET_DIR/debug/aoai-sim" \
  CHROMIUM="$CHROMIUM" SCREENSHOT="$SCREENSHOT" \
  node --test logic.test.js browser.test.js
say "screenshot: $SCREENSHOT"
