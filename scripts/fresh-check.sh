#!/usr/bin/env bash
# Runs the README's test command the way a newcomer meets it: a fresh clone of
# the current commit, an empty CARGO_HOME (only the rustup proxies copied in,
# so the installed toolchain is used), an empty target directory, and no
# cargo-deny, cargo-fuzz, Python venv or node_modules left over from earlier
# runs. What the machine itself has (apt packages, the rustup toolchain) is
# kept: .ci/run installs what is missing there.
#
# Prints the wall time of the whole command at the end. Everything is created
# under one scratch directory, removed afterwards unless KEEP=1.
#
# Usage: scripts/fresh-check.sh [REV]      (REV defaults to HEAD)
#   WARM=1  then runs scripts/test.sh a second time in the same clone, with
#           everything the first run installed and built, and times that too.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REV="${1:-HEAD}"

scratch="$(mktemp -d /tmp/aoai-lb-fresh.XXXXXX)"
if [ "${KEEP:-0}" != 1 ]; then
  trap 'rm -rf "$scratch"' EXIT
fi

say() { printf '[fresh-check] %s\n' "$*"; }

# An empty CARGO_HOME with the rustup proxies (cargo, rustc, ...) only: the
# registry index, every crate and every cargo-installed tool must come anew.
src_home="${CARGO_HOME:-$HOME/.cargo}"
mkdir -p "$scratch/cargo-home/bin"
for b in rustup cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver; do
  if [ -e "$src_home/bin/$b" ]; then cp -a "$src_home/bin/$b" "$scratch/cargo-home/bin/"; fi
done

say "cloning $REV into $scratch/repo"
git clone -q "$ROOT" "$scratch/repo"
git -C "$scratch/repo" checkout -q "$(git -C "$ROOT" rev-parse "$REV")"

export CARGO_HOME="$scratch/cargo-home"
export PATH="$CARGO_HOME/bin:$(printf '%s' "$PATH" | tr ':' '\n' | grep -v -x -F "$src_home/bin" | paste -sd:)"
unset CARGO_TARGET_DIR

say "CARGO_HOME=$CARGO_HOME; running .ci/run (which runs scripts/test.sh)"
start=$SECONDS
set +e
(cd "$scratch/repo" && .ci/run) 2>&1 | tee "$scratch/run.log"
rc=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))
say "fresh: exit $rc after $((elapsed / 60)) min $((elapsed % 60)) s"
if [ "$rc" -eq 0 ] && [ "${WARM:-0}" = 1 ]; then
  start=$SECONDS
  set +e
  (cd "$scratch/repo" && scripts/test.sh) >"$scratch/warm.log" 2>&1
  rc=$?
  set -e
  elapsed=$((SECONDS - start))
  [ "$rc" -eq 0 ] || tail -40 "$scratch/warm.log"
  say "warm: exit $rc after $((elapsed / 60)) min $((elapsed % 60)) s"
fi
exit "$rc"
