#!/usr/bin/env bash
# CPU per request with 100 named clients configured, next to the same
# gateway with API_KEY only, in one run (see bench/clients.py).
#
#   bench/clients.sh                    release build; 5 rounds x 4,000 requests
#   ROUNDS=3 REQUESTS=2000 bench/clients.sh
#   PROFILE=debug bench/clients.sh      the debug binaries (no release build)
#
# Not part of the test command: it builds release binaries and takes minutes.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PROFILE=${PROFILE:-release}
if [[ $PROFILE == release ]]; then
  (cd "$ROOT" && cargo build --release -q -p aoai-lb -p aoai-sim)
else
  (cd "$ROOT" && cargo build -q -p aoai-lb -p aoai-sim)
fi
exec python3 "$HERE/clients.py" "$ROOT/target/$PROFILE"
