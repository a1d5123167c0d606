#!/usr/bin/env bash
# Supply-chain check: licenses, bans (OpenSSL included, duplicate versions)
# and sources, per deny.toml. The advisory database needs network, so
# advisories are only checked with --with-advisories.
#
# cargo-deny reads the whole dependency graph through `cargo metadata`, which
# needs every crate of every platform in the local cache (windows-sys and
# friends included), not only the ones a Linux build downloads. A fresh
# machine has none of them, so `cargo fetch` (all platforms, from the lock
# file) runs first; after that the check itself works offline.
#
# cargo-deny is installed unoptimised (`--debug`): checking bans, licenses and
# sources of this graph takes about a second either way, and the debug build
# compiles in a fraction of the time of the release one.
# Usage: scripts/deny.sh [--with-advisories]
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2

installed="$(cargo deny --version 2>/dev/null || true)"
if [ "${installed#cargo-deny }" != "$CARGO_DENY_VERSION" ]; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION"
  cargo install --locked --debug "cargo-deny@$CARGO_DENY_VERSION"
fi

echo "==> cargo fetch (the dependency graph of every platform, from Cargo.lock)"
cargo fetch --locked

checks=(bans licenses sources)
if [ "${1:-}" = "--with-advisories" ]; then
  cargo deny check advisories "${checks[@]}"
else
  cargo deny --offline check "${checks[@]}"
fi
