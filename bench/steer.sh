#!/usr/bin/env bash
# Rate-limit-aware routing benchmark (issue 10): aoai-lb with steering,
# with steering and learned limits, without steering, and the LiteLLM proxy
# (usage-based-routing-v2), side by side in one run against simulators with
# Azure's admission model (see bench/steer.py for the set-up).
#
#   bench/steer.sh                         0.8x, 1.0x, 1.3x; 180 s each (about 10 min)
#   OFFERED=1.3 DURATION=120 bench/steer.sh
#   SKIP_LITELLM=1 bench/steer.sh          without the LiteLLM venv
#   PROFILE=release bench/steer.sh         release binaries (slow first build)
#   TPMS=90000,60000,30000 bench/steer.sh  unequal quotas (one per instance)
#   OUT_DIR=... BASE_PORT=... bench/steer.sh   a second run beside the first
#
# The load is a few requests per second, so the gateway's own speed does not
# matter here and the debug binaries are the default. Results go to
# bench/out/steer/ (steer.json, logs/), the table to stdout.
# Not part of the test command: it runs for minutes.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PROFILE=${PROFILE:-debug}
LITELLM_VERSION=${LITELLM_VERSION:-1.106.12}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ $PROFILE == release ]]; then
  (cd "$ROOT" && cargo build --release -q -p aoai-lb -p aoai-sim)
else
  (cd "$ROOT" && cargo build -q -p aoai-lb -p aoai-sim)
fi
# The openai SDK comes with litellm[proxy]; the same pinned venv as run.sh.
if ! "$HERE/.venv/bin/litellm" --version 2>/dev/null | grep -q "$LITELLM_VERSION"; then
  python3 -m venv "$HERE/.venv"
  "$HERE/.venv/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"
fi
OUT=${OUT_DIR:-$HERE/out/steer}
rm -rf "$OUT"
mkdir -p "$OUT"
exec "$HERE/.venv/bin/python" "$HERE/steer.py" "$TARGET/$PROFILE" "$HERE/.venv" "$OUT"
