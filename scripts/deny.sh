#!/usr/bin/env bash
# Supply-chain check: licenses, bans (OpenSSL included, duplicate versions)
# and sources, per deny.toml. Offline: the advisory database needs network,
# so advisories are only checked with --with-advisories.
# Usage: scripts/deny.sh [--with-advisories]
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2

installed="$(cargo deny --version 2>/dev/null || true)"
if [ "${installed#cargo-deny }" != "$CARGO_DENY_VERSION" ]; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION"
  cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi

checks=(bans licenses sources)
if [ "${1:-}" = "--with-advisories" ]; then
  cargo deny check advisories "${checks[@]}"
else
  cargo deny --offline check "${checks[@]}"
fi
