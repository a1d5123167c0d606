#!/usr/bin/env bash
# What sharing state through Redis costs on the request path: the same
# gateway binary with and without a `redis` block (leases for a limited
# client, shared cooldowns and affinity), side by side in one run, against
# the same two simulated instances and a local redis-server.
#
# Per round and target: wrk (1 thread, CONNS keep-alive connections, SECS s)
# posts small chat completions as a client with rpm/tpm limits far above
# what the run can reach, so every request goes through admission. Figures:
# requests/s, p50/p99 latency, the gateway's CPU per request (utime+stime
# from /proc, background Redis tasks included), and Redis commands per
# request (INFO commandstats before and after; the server is shared, so
# the idle redis-configured gateway's background commands show in the
# no-redis rows too: they are per second, not per request). Rounds are interleaved; the
# report gives medians and the median of per-round ratios.
#
# Usage: bench/redis.sh            (ROUNDS=3 SECS=5 CONNS=16 PIN=1)
# Needs: wrk and redis-server (installed from Debian when missing, as root),
# release builds of aoai-lb and aoai-sim (built here; honours CARGO_TARGET_DIR).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-5}"
CONNS="${CONNS:-16}"
PIN="${PIN:-1}"
OUT="$HERE/out/redis"
mkdir -p "$OUT"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

(cd "$ROOT" && cargo build --release -q -p aoai-lb -p aoai-sim)
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
on_cpu() { if [[ $PIN == 1 ]]; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }
ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
calls() { redis-cli -p "$RPORT" info commandstats | awk -F'[=,:]' '/^cmdstat_/ {n += $3} END {print n + 0}'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

RPORT=$(free_port)
on_cpu 1 redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
SPORT=$(free_port)
on_cpu 1 "$BIN/aoai-sim" --instances 2 --base-port "$SPORT" --api-key sim-key --threads 1 >"$OUT/sim.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done

doc() {
  python3 - "$SPORT" "$1" "$RPORT" <<'EOF'
import json, sys
sport, with_redis, rport = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
d = {
    "instances": [
        {"name": f"sim{i}", "url": f"http://127.0.0.1:{sport + i}", "api_key": "sim-key"}
        for i in range(2)
    ],
    "clients": [{"name": "bench", "key": "bench-key", "rpm": 10**9, "tpm": 10**12}],
}
if with_redis:
    d["redis"] = {"url": f"redis://127.0.0.1:{rport}", "key_prefix": "bench:"}
print(json.dumps(d))
EOF
}

start_lb() { # name with_redis
  local port admin
  port=$(free_port); admin=$(free_port)
  local pin=()
  [[ $PIN == 1 ]] && pin=(taskset -c 0)
  # Started directly (not through a shell function), so that $! is the
  # gateway itself: taskset execs it.
  env OPENAI_INSTANCES="$(doc "$2")" HOST=127.0.0.1 PORT="$port" ADMIN_PORT="$admin" \
    TOKIO_WORKER_THREADS=1 "${pin[@]}" "$BIN/aoai-lb" >"$OUT/lb-$1.log" 2>&1 &
  PIDS+=($!)
  eval "LB_PID_$1=$!; LB_PORT_$1=$port; LB_ADMIN_$1=$admin"
}
start_lb local 0
start_lb redis 1
for t in local redis; do
  p="LB_PORT_$t"
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:${!p}/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
done
for _ in $(seq 100); do
  curl -s "http://127.0.0.1:$LB_ADMIN_redis/admin/redis" | grep -q '"state":"up"' && break; sleep 0.05
done

PATH_Q="/openai/deployments/bench-chat/chat/completions?api-version=2024-10-21"
export BENCH_KEY=bench-key
: >"$OUT/runs.jsonl"
started=$(date -u +%H:%M)
for r in $(seq "$ROUNDS"); do
  for t in local redis; do
    pid="LB_PID_$t"; port="LB_PORT_$t"
    # warm-up
    on_cpu 1 wrk -t1 -c"$CONNS" -d1s -s "$HERE/chat.lua" "http://127.0.0.1:${!port}$PATH_Q" >/dev/null
    c0=$(ticks "${!pid}"); k0=$(calls); t0=$(date +%s%N)
    WRK_JSON="$OUT/wrk-$t-$r.json" on_cpu 1 wrk -t1 -c"$CONNS" -d"${SECS}s" -s "$HERE/chat.lua" \
      "http://127.0.0.1:${!port}$PATH_Q" >/dev/null
    t1=$(date +%s%N); c1=$(ticks "${!pid}"); k1=$(calls)
    printf '{"round":%d,"target":"%s","wall_ns":%d,"clk_tck":%d,"cpu_ticks":%d,"redis_calls":%d,"wrk":%s}\n' \
      "$r" "$t" $((t1 - t0)) "$(getconf CLK_TCK)" $((c1 - c0)) $((k1 - k0)) "$(cat "$OUT/wrk-$t-$r.json")" \
      >>"$OUT/runs.jsonl"
  done
done

python3 - "$OUT/runs.jsonl" "$started" "$ROUNDS" "$SECS" "$CONNS" <<'EOF'
import json, statistics as st, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
for r in runs:
    w = r["wrk"]
    bad = sum(w["errors"].values())
    if bad:
        sys.exit(f"round {r['round']} {r['target']}: {bad} errors: {w['errors']}")
    r["rps"] = w["requests"] / (w["duration_us"] / 1e6)
    r["cpu_us"] = r["cpu_ticks"] / r["clk_tck"] * 1e6 / w["requests"]
    r["calls_per_req"] = r["redis_calls"] / w["requests"]
    r["calls_per_s"] = r["redis_calls"] / (r["wall_ns"] / 1e9)
    if r["cpu_ticks"] == 0:
        sys.exit(f"round {r['round']} {r['target']}: no CPU ticks recorded for the gateway")
def med(t, f): return st.median(f(r) for r in runs if r["target"] == t)
def ratio(f):
    out = []
    for n in sorted({r["round"] for r in runs}):
        a = next(r for r in runs if r["round"] == n and r["target"] == "redis")
        b = next(r for r in runs if r["round"] == n and r["target"] == "local")
        out.append(f(a) / f(b))
    return st.median(out)
print(f"bench/redis.sh: {sys.argv[3]} rounds of {sys.argv[4]} s at {sys.argv[5]} connections, started {sys.argv[2]} UTC")
print()
print("| target | req/s | p50 µs | p99 µs | gateway CPU µs/req | Redis commands/req | Redis commands/s |")
print("|---|---|---|---|---|---|---|")
for t, label in (("local", "no redis block"), ("redis", "redis block (lease mode)")):
    print(f"| {label} | {med(t, lambda r: r['rps']):,.0f} | {med(t, lambda r: r['wrk']['latency_us']['p50']):,.0f} | "
          f"{med(t, lambda r: r['wrk']['latency_us']['p99']):,.0f} | {med(t, lambda r: r['cpu_us']):.1f} | "
          f"{med(t, lambda r: r['calls_per_req']):.4f} | {med(t, lambda r: r['calls_per_s']):.1f} |")
print()
print(f"Ratios redis/local (median of per-round ratios): req/s {ratio(lambda r: r['rps']):.3f}, "
      f"CPU per request {ratio(lambda r: r['cpu_us']):.3f}, p50 {ratio(lambda r: r['wrk']['latency_us']['p50']):.3f}")
EOF
