#!/usr/bin/env bash
# Soak: >= 200,000 mixed streaming and non-streaming requests through the
# release gateway in front of three release simulator instances, with
# faults injected at run time (cut streams, resets, 429s, 503s, hangs,
# drips) plus a standing 0.5 % of 503s on one instance. Reports the
# gateway's RSS and open descriptors after a warm-up and at the end, and
# fails on growth beyond noise, on a gateway crash or panic line. Idle
# pooled upstream connections expire after 2 s here, so the samples (taken
# after a 4 s pause with the load's connections closed) compare like with
# like.
#
# Usage: scripts/soak.sh [REQUESTS] [CONCURRENCY]   (defaults 200000, 64)
# Everything listens on 127.0.0.1; the run is bounded (the driver has
# per-request timeouts; the whole script is capped at 30 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS="${1:-200000}"
CONCURRENCY="${2:-64}"
SIM_PORT="${SOAK_SIM_PORT:-18650}"
KEY="soak-client-key-$$"
TARGET="${CARGO_TARGET_DIR:-target}"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> building release binaries"
cargo build --release -p aoai-lb -p aoai-sim

cat >"$work/sims.json" <<JSON
[
  {"name": "soak0", "admin": true, "latency": {"ttft_ms": 2, "per_token_ms": 1}, "reply_tokens": 16,
   "faults": [{"kind": "fail_fraction", "fraction": 0.005, "status": 503, "seed": 11}]},
  {"name": "soak1", "admin": true, "latency": {"ttft_ms": 2, "per_token_ms": 1}, "reply_tokens": 16},
  {"name": "soak2", "admin": true, "latency": {"ttft_ms": 2, "per_token_ms": 1}, "reply_tokens": 16}
]
JSON
"$TARGET/release/aoai-sim" --config "$work/sims.json" --base-port "$SIM_PORT" --host 127.0.0.1 \
  >"$work/sim.log" 2>&1 &
pids+=($!)

instances=""
sims=""
for i in 0 1 2; do
  port=$((SIM_PORT + i))
  instances+="${instances:+,}{\"name\":\"soak$i\",\"url\":\"http://127.0.0.1:$port\",\"api_key\":\"sim-key\"}"
  sims+="${sims:+,}http://127.0.0.1:$port"
done
doc="{\"instances\":[$instances],\"timeouts\":{\"response_headers_ms\":1000,\"stream_idle_ms\":2000},\"upstream\":{\"pool_idle_timeout_ms\":2000}}"

OPENAI_INSTANCES="$doc" API_KEY="$KEY" "$TARGET/release/aoai-lb" \
  --host 127.0.0.1 --port 0 --admin-port 0 >"$work/gw.out" 2>"$work/gw.err" &
gw=$!
pids+=("$gw")

addr=""
for _ in $(seq 1 100); do
  addr="$(grep -m1 '"listening"' "$work/gw.out" 2>/dev/null \
    | sed -n 's/.*"address":"\([^"]*\)".*/\1/p' || true)"
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "gateway did not start"; cat "$work/gw.err"; exit 1; }
echo "==> gateway $addr (pid $gw), simulators on $SIM_PORT..$((SIM_PORT + 2))"

echo "==> driving $REQUESTS requests at concurrency $CONCURRENCY"
SOAK_URL="http://$addr" SOAK_KEY="$KEY" SOAK_PID="$gw" SOAK_SIMS="$sims" \
SOAK_REQUESTS="$REQUESTS" SOAK_CONCURRENCY="$CONCURRENCY" \
  timeout 1800 cargo test -p aoai-lb --test it -- --ignored --nocapture reliability_soak::

kill -0 "$gw" || { echo "gateway died"; exit 1; }
if grep -qi 'panicked' "$work/gw.out" "$work/gw.err"; then
  echo "gateway printed a panic"; grep -i -m5 'panicked' "$work/gw.out" "$work/gw.err"; exit 1
fi
echo "==> access lines written: $(grep -c '"aoai_lb::access"' "$work/gw.out" || true)"
