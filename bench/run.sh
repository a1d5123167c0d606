#!/usr/bin/env bash
# Benchmark: aoai-lb next to nginx, the LiteLLM proxy and going direct, all in
# one run on this machine, against aoai-sim on loopback.
#
#   bench/run.sh            full run (about 10-12 minutes after the first build)
#   QUICK=1 bench/run.sh    one round, short runs: a smoke test of the harness
#
# What it measures (see bench/README.md for the method), by default as a user
# runs it: no pinning, aoai-lb with its defaults, nginx with one worker:
#   a. non-streaming chat at concurrency 64: req/s, p50/p99, CPU per request,
#      peak RSS; direct, aoai-lb, nginx (access log off, and on: nginx-log),
#      LiteLLM
#   b. light load (1 and 16 connections): latency added over going direct
#   c. 1,000 concurrent SSE streams, 100 events 20 ms apart: added time to
#      first byte, inter-event gap deviation, RSS; and the same at light load
#      (50 streams started over 5 s)
#   d. 10,000 concurrent open streams (or as many as the open-files limit
#      allows) through aoai-lb and through nginx, one after the other: KiB per
#      open stream, and RSS 2 s and 10 s after the burst against idle RSS
#   e. footprint: idle RSS, binary size, start-to-ready time
#
# Everything listens on 127.0.0.1 only. Every load step is bounded in time
# (wrk -d, the stream client's --timeout-s) and every server started here is
# stopped on exit, by process id.
#
# Outputs: bench/out/raw/*.json (one file per measurement),
#          bench/out/results.json and bench/out/results.md (medians, ratios,
#          targets), bench/out/logs/ (server logs).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

# ---- knobs (environment) -------------------------------------------------
QUICK=${QUICK:-0}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}          # seconds per max-throughput run
LIGHT_DURATION=${LIGHT_DURATION:-5}
WARMUP=${WARMUP:-2}
STREAMS=${STREAMS:-1000}
STREAMS_LIGHT=${STREAMS_LIGHT:-50}           # light streaming: about 20 open at a time
STREAMS_LIGHT_RAMP_MS=${STREAMS_LIGHT_RAMP_MS:-5000}
STREAM_EVENTS=${STREAM_EVENTS:-100}
STREAM_GAP_MS=${STREAM_GAP_MS:-20}
OPEN_STREAMS=${OPEN_STREAMS:-10000}
SETTLE_S=${SETTLE_S:-10}          # RSS is read this long after the open streams end
WARM_STREAMS=${WARM_STREAMS:-100} # streams through each proxy before its idle RSS is read
FOOTPRINT_STARTS=${FOOTPRINT_STARTS:-5}
PIN=${PIN:-0}                     # 1: servers under test on CPU_PROXY, load on CPU_LOAD
                                  # (0, the default: no pinning, as a user runs it)
BENCH_NICE=${BENCH_NICE:--20}     # priority of every process the benchmark starts
CPU_PROXY=${CPU_PROXY:-0}
CPU_LOAD=${CPU_LOAD:-1}
SKIP_LITELLM=${SKIP_LITELLM:-0}
SKIP_INSTALL=${SKIP_INSTALL:-0}
BASE_PORT=${BASE_PORT:-18100}
LITELLM_VERSION=${LITELLM_VERSION:-1.106.12}
GATEWAY_LOG=${GATEWAY_LOG:-/dev/null}   # where aoai-lb's per-request JSON log goes
OUT=${BENCH_OUT:-$HERE/out}
# A second aoai-lb build (directory holding its aoai-lb binary) measured as
# `aoai-lb-b` right after `aoai-lb` in every max-throughput round: before and
# after a change, interleaved in one run.
BENCH_BIN_B=${BENCH_BIN_B:-}
THROUGHPUT_ONLY=${THROUGHPUT_ONLY:-0}  # 1: only steps a and e (no light load, streams, open streams)
if [[ $QUICK == 1 ]]; then
  ROUNDS=1 DURATION=3 LIGHT_DURATION=2 WARMUP=1 STREAMS=200 OPEN_STREAMS=1000 FOOTPRINT_STARTS=2
  STREAMS_LIGHT=20 STREAMS_LIGHT_RAMP_MS=2000
fi

SIM_KEY=sim-key
CLIENT_KEY=sk-bench-client
DEPLOYMENT=bench-chat
API_VERSION=2024-10-21
CHAT_PATH="/openai/deployments/$DEPLOYMENT/chat/completions?api-version=$API_VERSION"

# Ports: three simulator pairs (fast, streaming, long-lived), one gateway per
# pair, nginx in front of the fast and streaming pairs, LiteLLM on the fast one.
P_SIM_FAST=$((BASE_PORT + 0))     # +0, +1
P_SIM_STREAM=$((BASE_PORT + 10))  # +10, +11
P_SIM_OPEN=$((BASE_PORT + 20))    # +20, +21
P_LB_FAST=$((BASE_PORT + 100))
P_LB_STREAM=$((BASE_PORT + 110))
P_LB_OPEN=$((BASE_PORT + 120))
P_LB_FOOT=$((BASE_PORT + 130))
P_LB_B=$((BASE_PORT + 140))
P_NGX_FAST=$((BASE_PORT + 200))
P_NGX_STREAM=$((BASE_PORT + 210))
P_NGX_LOG=$((BASE_PORT + 220))
P_NGX_OPEN=$((BASE_PORT + 230))
P_LITELLM=$((BASE_PORT + 300))

RAW=$OUT/raw
LOGS=$OUT/logs
RUN=$OUT/run
CLK_TCK=$(getconf CLK_TCK)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- process bookkeeping -------------------------------------------------
PIDS=()
cleanup() {
  local pid
  restore_priority
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# The kernel groups processes by session for scheduling (autogroup), so a
# process's own nice value only ranks it within its session. To keep other
# sessions' jobs on a shared host from starving the run, raise this session's
# group priority for the run's duration and restore it on exit.
AUTOGROUP_SAVED=""
raise_priority() {
  local f=/proc/$$/autogroup
  [[ -n $BENCH_NICE && $BENCH_NICE != 0 && -w $f ]] || return 0
  AUTOGROUP_SAVED=$(awk '{print $NF}' "$f")
  if echo "$BENCH_NICE" >"$f" 2>/dev/null; then
    log "scheduling priority of this session raised (autogroup nice $BENCH_NICE) for the run"
  else
    AUTOGROUP_SAVED=""
  fi
}
restore_priority() {
  [[ -z $AUTOGROUP_SAVED ]] || echo "$AUTOGROUP_SAVED" >"/proc/$$/autogroup" 2>/dev/null || true
}
trap 'exit 130' INT TERM

# prefix CPU: the command prefix that pins to CPU (when pinning is on) and
# raises priority (when allowed), so that background jobs on a shared host
# disturb the measurement less. Applies to servers and load generators alike.
prefix() {
  PREFIX=()
  if [[ $PIN == 1 ]]; then PREFIX+=(taskset -c "$1"); fi
  if [[ -n $BENCH_NICE && $BENCH_NICE != 0 ]] && nice -n "$BENCH_NICE" true 2>/dev/null; then
    PREFIX+=(nice -n "$BENCH_NICE")
  fi
}

# pinned CPU CMD...: runs CMD with the prefix for CPU.
pinned() {
  local cpu=$1; shift
  prefix "$cpu"
  "${PREFIX[@]}" "$@"
}

# start NAME CPU STDOUT CMD...: starts a server in the background; sets LAST_PID.
# The command runs as a plain background job (taskset, nice and env all
# exec), so $! is the server's own pid, never a wrapper subshell's.
start() {
  local name=$1 cpu=$2 stdout=$3; shift 3
  prefix "$cpu"
  "${PREFIX[@]}" "$@" >"$stdout" 2>"$LOGS/$name.err" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# stop PID: ends one server started here and waits for it.
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# tree PID: the process and all its descendants.
tree() {
  local p=$1 c
  echo "$p"
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done
}

# cpu_ticks PID...: utime+stime summed over the processes, in clock ticks.
cpu_ticks() {
  local t=0 p v
  for p in "$@"; do
    v=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
    t=$((t + v))
  done
  echo "$t"
}

# user_ticks PID...: utime alone, to tell user-space work from syscalls.
user_ticks() {
  local t=0 p v
  for p in "$@"; do
    v=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12}')
    t=$((t + v))
  done
  echo "$t"
}

# mem_kib FIELD PID...: a /proc/PID/status field (VmRSS, VmHWM) summed, in KiB.
mem_kib() {
  local field=$1 t=0 p v; shift
  for p in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status")
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# reset_peak PID...: restarts VmHWM from the current RSS (clear_refs 5), so
# each measurement's peak is its own.
reset_peak() {
  local p
  for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done
}

now_ns() { date +%s%N; }

bench_client() { "$BIN/aoai-bench" "$@"; }

# wait_ready URL [extra args]: blocks until the URL answers 200 (or TCP accept
# with --tcp); prints the JSON from `aoai-bench ready`.
wait_ready() {
  local url=$1; shift
  bench_client ready --url "$url" "$@"
}

# ---- install -------------------------------------------------------------
install_deps() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v taskset >/dev/null || missing+=(util-linux)
  command -v ss >/dev/null || missing+=(iproute2)
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [[ $SKIP_LITELLM != 1 ]]; then
    if ! "$HERE/.venv/bin/litellm" --version 2>/dev/null | grep -q "$LITELLM_VERSION"; then
      log "installing litellm[proxy]==$LITELLM_VERSION into bench/.venv"
      python3 -m venv "$HERE/.venv"
      "$HERE/.venv/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"
    fi
  fi
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -q -p aoai-lb -p aoai-sim -p aoai-bench)
}

# ---- servers -------------------------------------------------------------
# start_sims NAME PORT FLAGS...: two simulator instances on PORT and PORT+1.
start_sims() {
  local name=$1 port=$2; shift 2
  start "sim-$name" "$CPU_LOAD" /dev/null \
    "$BIN/aoai-sim" --instances 2 --base-port "$port" --api-key "$SIM_KEY" "$@"
  SIM_PID=$LAST_PID
  wait_ready "http://127.0.0.1:$port/" --tcp --timeout-s 60 >/dev/null
  wait_ready "http://127.0.0.1:$((port + 1))/" --tcp --timeout-s 60 >/dev/null
}

# start_gateway NAME PORT SIM_PORT: aoai-lb over the pair at SIM_PORT; sets
# LB_PID and LB_READY_JSON (start-to-ready time).
start_gateway() {
  local name=$1 port=$2 sim=$3 t0
  local instances
  instances=$(printf '{"instances":[{"name":"sim-a","url":"http://127.0.0.1:%d","api_key":"%s"},{"name":"sim-b","url":"http://127.0.0.1:%d","api_key":"%s"}]}' \
    "$sim" "$SIM_KEY" "$((sim + 1))" "$SIM_KEY")
  t0=$(now_ns)
  start "lb-$name" "$CPU_PROXY" "$GATEWAY_LOG" \
    env OPENAI_INSTANCES="$instances" API_KEY="$CLIENT_KEY" HOST=127.0.0.1 \
    PORT="$port" ADMIN_PORT="$((port + 1))" "$BIN/aoai-lb"
  LB_PID=$LAST_PID
  LB_READY_JSON=$(pinned "$CPU_LOAD" "$BIN/aoai-bench" ready --url "http://127.0.0.1:$port/readyz" --since-ns "$t0" --timeout-s 30)
}

# start_nginx NAME PORT SIM_PORT BUFFERING [ACCESS_LOG] [CONNECTIONS]: one
# nginx (master + one worker) over the pair at SIM_PORT; sets NGX_PID (the
# master). ACCESS_LOG is `off` (default) or `on`: a file in the run
# directory, nginx's default `combined` format, written per request as a
# user's default configuration does.
start_nginx() {
  local name=$1 port=$2 sim=$3 buffering=$4 access=${5:-off} conns=${6:-4096} dir="$RUN/nginx-$1"
  mkdir -p "$dir"
  if [[ $access == on ]]; then access="$dir/access.log combined"; fi
  sed -e "s|@RUN@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@BUFFERING@|$buffering|g" \
    -e "s|@SIM_A@|$sim|g" -e "s|@SIM_B@|$((sim + 1))|g" -e "s|@SIM_KEY@|$SIM_KEY|g" \
    -e "s|@ACCESS_LOG@|$access|g" -e "s|@CONNECTIONS@|$conns|g" -e "s|@NOFILE@|$(ulimit -n)|g" \
    "$HERE/nginx.conf.in" >"$dir/nginx.conf"
  start "nginx-$name" "$CPU_PROXY" "$LOGS/nginx-$name.out" \
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$LOGS/nginx-$name-error.log"
  NGX_PID=$LAST_PID
  wait_ready "http://127.0.0.1:$port/" --tcp --timeout-s 30 >/dev/null
}

start_litellm() {
  mkdir -p "$RUN/litellm"
  sed -e "s|@SIM_A@|$P_SIM_FAST|g" -e "s|@SIM_B@|$((P_SIM_FAST + 1))|g" \
    -e "s|@SIM_KEY@|$SIM_KEY|g" -e "s|@CLIENT_KEY@|$CLIENT_KEY|g" \
    -e "s|@DEPLOYMENT@|$DEPLOYMENT|g" -e "s|@API_VERSION@|$API_VERSION|g" \
    "$HERE/litellm.yaml.in" >"$RUN/litellm/config.yaml"
  # The local cost map keeps LiteLLM from fetching one at start-up. `env` and
  # `taskset` exec, so the recorded pid is LiteLLM's own.
  start litellm "$CPU_PROXY" "$LOGS/litellm.out" \
    env -C "$RUN/litellm" LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR LITELLM_TELEMETRY=False \
    "$HERE/.venv/bin/litellm" --config "$RUN/litellm/config.yaml" \
    --host 127.0.0.1 --port "$P_LITELLM" --num_workers 1
  LITELLM_PID=$LAST_PID
  wait_ready "http://127.0.0.1:$P_LITELLM/health/readiness" --interval-ms 100 --timeout-s 120 >/dev/null
}

# ---- measurements --------------------------------------------------------
# record FILE JSON: writes one measurement.
record() { printf '%s\n' "$2" >"$RAW/$1.json"; }

# wrk_json OUT CONNS SECONDS URL KEY
wrk_json() {
  local out=$1 conns=$2 secs=$3 url=$4 key=$5
  BENCH_KEY=$key WRK_JSON=$out pinned "$CPU_LOAD" \
    wrk -t1 -c"$conns" -d"${secs}s" --timeout 10s -s "$HERE/chat.lua" "$url" >/dev/null
}

# check_wrk FILE LABEL: warns (and the report marks the row) on any error.
check_wrk() {
  python3 - "$1" "$2" <<'EOF' >&2
import json, sys
d = json.load(open(sys.argv[1]))
bad = {k: v for k, v in d["errors"].items() if v}
if bad or d["requests"] == 0:
    print(f"[warn] {sys.argv[2]}: requests={d['requests']} errors={bad}")
EOF
}

# throughput TARGET ROUND URL KEY PIDS...
throughput() {
  local target=$1 round=$2 url=$3 key=$4; shift 4
  local pids=("$@") tmp="$RUN/wrk.json" c0 c1 u0 u1 s0 s1 t0 t1 secs=$DURATION
  # LiteLLM answers in seconds at 64 connections: give it enough time to
  # complete a meaningful number of requests.
  if [[ $target == litellm ]] && ((secs < 10)); then secs=10; fi
  wrk_json "$tmp" 64 "$WARMUP" "$url" "$key"
  reset_peak "${pids[@]}"
  c0=$(cpu_ticks "${pids[@]}"); u0=$(user_ticks "${pids[@]}"); s0=$(cpu_ticks "$SIM_FAST_PID"); t0=$(now_ns)
  wrk_json "$tmp" 64 "$secs" "$url" "$key"
  t1=$(now_ns); c1=$(cpu_ticks "${pids[@]}"); u1=$(user_ticks "${pids[@]}"); s1=$(cpu_ticks "$SIM_FAST_PID")
  check_wrk "$tmp" "throughput $target round $round"
  record "throughput-$target-r$round" "$(printf '{"test":"throughput","target":"%s","round":%d,"conns":64,"wall_ns":%d,"clk_tck":%d,"cpu_ticks":%d,"user_ticks":%d,"sim_cpu_ticks":%d,"hwm_kib":%d,"rss_kib":%d,"wrk":%s}' \
    "$target" "$round" "$((t1 - t0))" "$CLK_TCK" "$((c1 - c0))" "$((u1 - u0))" "$((s1 - s0))" \
    "$(mem_kib VmHWM "${pids[@]}")" "$(mem_kib VmRSS "${pids[@]}")" "$(cat "$tmp")")"
  log "  throughput $target: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["requests"]*1e6/d["duration_us"]), "req/s, p50", d["latency_us"]["p50"], "us, p99", d["latency_us"]["p99"], "us")' "$tmp")"
}

# light TARGET ROUND CONNS URL KEY
light() {
  local target=$1 round=$2 conns=$3 url=$4 key=$5 tmp="$RUN/wrk.json"
  wrk_json "$tmp" "$conns" "$LIGHT_DURATION" "$url" "$key"
  check_wrk "$tmp" "light c$conns $target round $round"
  record "light-c$conns-$target-r$round" "$(printf '{"test":"light","target":"%s","round":%d,"conns":%d,"wrk":%s}' \
    "$target" "$round" "$conns" "$(cat "$tmp")")"
}

# Gaps left out of the deviation statistics: the simulator's preamble and
# closing events are sent back to back, not 20 ms apart (see README).
STREAM_SKIP_FIRST=${STREAM_SKIP_FIRST:-1}
STREAM_SKIP_LAST=${STREAM_SKIP_LAST:-2}

# streams TEST COUNT RAMP_MS TARGET ROUND URL KEY PIDS...
streams() {
  local test=$1 count=$2 ramp=$3 target=$4 round=$5 url=$6 key=$7; shift 7
  local pids=("$@") out c0 c1 hwm
  ((${#pids[@]})) && reset_peak "${pids[@]}"
  c0=0; ((${#pids[@]})) && c0=$(cpu_ticks "${pids[@]}")
  out=$(pinned "$CPU_LOAD" "$BIN/aoai-bench" streams --url "$url" --key "$key" \
    --streams "$count" --ramp-ms "$ramp" --expected-gap-ms "$STREAM_GAP_MS" \
    --skip-first-gaps "$STREAM_SKIP_FIRST" --skip-last-gaps "$STREAM_SKIP_LAST" \
    --timeout-s 60)
  c1=0; hwm=0
  if ((${#pids[@]})); then c1=$(cpu_ticks "${pids[@]}"); hwm=$(mem_kib VmHWM "${pids[@]}"); fi
  record "$test-$target-r$round" "$(printf '{"test":"%s","target":"%s","round":%d,"clk_tck":%d,"cpu_ticks":%d,"hwm_kib":%d,"client":%s}' \
    "$test" "$target" "$round" "$CLK_TCK" "$((c1 - c0))" "$hwm" "$out")"
  log "  $test $target: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["outcomes"], "ttfb p50", d["ttfb_us"].get("p50"), "us, gap dev p99", d["gap_dev_us"].get("p99"), "us")' "$out")"
}

# open_streams TARGET URL PIDS...: OPEN_STREAMS long streams through the
# proxy, held until every one is open at the same time, then closed by the
# client. Records idle RSS (before), RSS with all open, the peak, and RSS 2 s
# and SETTLE_S seconds after the streams ended. The proxy is fresh: started
# for this step only, so its idle RSS is its own. Before the idle reading,
# WARM_STREAMS streams go through it and are cut the same way, so that
# one-time set-up a first burst triggers (aoai-lb builds its tokenizers when
# the first cut stream needs a token estimate) counts as idle, not as memory
# kept from the burst; the cold reading is recorded too.
open_streams() {
  local target=$1 url=$2; shift 2
  local pids=("$@") idle cold marker="$RUN/all-open-$target" at_open="$RUN/rss-at-open-$target"
  sleep 0.5
  cold=$(mem_kib VmRSS "${pids[@]}")
  if ((WARM_STREAMS > 0)); then
    pinned "$CPU_LOAD" "$BIN/aoai-bench" streams --url "$url" --key "$CLIENT_KEY" \
      --streams "$WARM_STREAMS" --ramp-ms 200 --close-after-open-ms 200 \
      --expected-gap-ms 1000 --timeout-s 30 >/dev/null
    sleep 2
  fi
  idle=$(mem_kib VmRSS "${pids[@]}")
  reset_peak "${pids[@]}"
  rm -f "$marker"; : >"$at_open"
  (
    for ((i = 0; i < 1200; i++)); do
      if [[ -f $marker ]]; then mem_kib VmRSS "${pids[@]}" >"$at_open"; break; fi
      sleep 0.05
    done
  ) &
  local sampler=$!
  local out
  out=$(pinned "$CPU_LOAD" "$BIN/aoai-bench" streams --url "$url" \
    --key "$CLIENT_KEY" --streams "$OPEN_STREAMS" --ramp-ms 5000 --close-after-open-ms 1000 \
    --open-marker "$marker" --expected-gap-ms 1000 --timeout-s 90)
  wait "$sampler" || true
  local hwm after2 after
  hwm=$(mem_kib VmHWM "${pids[@]}")
  sleep 2
  after2=$(mem_kib VmRSS "${pids[@]}")
  sleep "$((SETTLE_S > 2 ? SETTLE_S - 2 : 0))"
  after=$(mem_kib VmRSS "${pids[@]}")
  record "open-streams-$target" "$(printf '{"test":"open_streams","target":"%s","streams":%d,"idle_rss_kib":%d,"rss_at_all_open_kib":%s,"hwm_kib":%d,"rss_after_close_kib":%d,"rss_after_settle_kib":%d,"settle_s":%d,"cold_idle_rss_kib":%d,"warm_streams":%d,"nofile":%d,"client":%s}' \
    "$target" "$OPEN_STREAMS" "$idle" "$(grep . "$at_open" || echo null)" "$hwm" "$after2" "$after" "$SETTLE_S" "$cold" "$WARM_STREAMS" "$(ulimit -n)" "$out")"
  log "  open streams $target: $(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["outcomes"], "max open", d["max_open"])' "$out"), idle $idle KiB, peak $hwm KiB, ${SETTLE_S}s after $after KiB"
}

machine_json() {
  python3 - "$@" <<'EOF'
import json, platform, subprocess, sys, os, datetime
def run(*cmd, any_status=False):
    # wrk -v prints its version and exits with status 1.
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except Exception:
        return "unknown"
    if p.returncode != 0 and not any_status:
        return "unknown"
    return (p.stdout.strip() + " " + p.stderr.strip()).strip() or "unknown"
cpu = "unknown"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip(); break
mem = open("/proc/meminfo").readline().split()[1]
print(json.dumps({
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
    "mem_kib": int(mem),
    "rustc": run("rustc", "--version"),
    "nginx": run("nginx", "-v"),
    "wrk": run("wrk", "-v", any_status=True).splitlines()[0],
    "revision": os.environ.get("BENCH_REV") or run("git", "-C", os.environ.get("ROOT", "."), "describe", "--always", "--dirty"),
    "litellm": sys.argv[1],
    "command": sys.argv[2],
    "nofile": sys.argv[3],
}))
EOF
}

# ports_free PORT...: fails when something already listens on one of them
# (a leftover server would silently answer in place of the one under test).
ports_free() {
  local p
  for p in "$@"; do
    if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is in use; set BASE_PORT"; fi
  done
}

# ---- main ----------------------------------------------------------------
main() {
  mkdir -p "$OUT"
  rm -rf "$RAW" "$RUN"
  mkdir -p "$RAW" "$LOGS" "$RUN"
  local begin; begin=$(date +%s)

  [[ $SKIP_INSTALL == 1 ]] || install_deps
  raise_priority
  BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
  [[ -x $BIN/aoai-lb && -x $BIN/aoai-sim && -x $BIN/aoai-bench ]] || die "release binaries missing in $BIN"

  # Each open stream through the gateway holds two descriptors (client and
  # upstream); raise the soft limit as far as the hard limit allows.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  local nofile; nofile=$(ulimit -n)
  local open_max=$(((nofile - 200) / 2))
  if ((OPEN_STREAMS > open_max)); then
    log "open-files limit $nofile allows $open_max streams through one proxy, not $OPEN_STREAMS"
    OPEN_STREAMS=$open_max
  fi

  local llm_version="skipped"
  [[ $SKIP_LITELLM == 1 ]] || llm_version=$("$HERE/.venv/bin/litellm" --version 2>/dev/null | grep -o '[0-9][0-9.]*' | tail -1 || echo unknown)
  ROOT=$ROOT machine_json "$llm_version" "${BENCH_COMMAND:-bench/run.sh}" "$nofile" >"$RAW/machine.json"

  ports_free "$P_SIM_FAST" "$((P_SIM_FAST + 1))" "$P_SIM_STREAM" "$((P_SIM_STREAM + 1))" \
    "$P_SIM_OPEN" "$((P_SIM_OPEN + 1))" "$P_LB_FAST" "$((P_LB_FAST + 1))" "$P_LB_STREAM" \
    "$((P_LB_STREAM + 1))" "$P_LB_OPEN" "$((P_LB_OPEN + 1))" "$P_LB_FOOT" "$((P_LB_FOOT + 1))" \
    "$P_NGX_FAST" "$P_NGX_STREAM" "$P_NGX_LOG" "$P_NGX_OPEN" "$P_LB_B" "$((P_LB_B + 1))" "$P_LITELLM"

  log "starting simulators"
  start_sims fast "$P_SIM_FAST" --ttft-ms 0 --token-ms 0 --reply-tokens 16
  SIM_FAST_PID=$SIM_PID
  start_sims stream "$P_SIM_STREAM" --ttft-ms 0 --token-ms "$STREAM_GAP_MS" --reply-tokens "$STREAM_EVENTS"
  SIM_STREAM_PID=$SIM_PID

  log "footprint: $FOOTPRINT_STARTS cold starts of aoai-lb"
  local i
  for ((i = 1; i <= FOOTPRINT_STARTS; i++)); do
    start_gateway foot "$P_LB_FOOT" "$P_SIM_FAST"
    sleep 0.5
    record "footprint-r$i" "$(printf '{"test":"footprint","round":%d,"ready":%s,"idle_rss_kib":%d,"binary_bytes":%d}' \
      "$i" "$LB_READY_JSON" "$(mem_kib VmRSS "$LB_PID")" "$(stat -c %s "$BIN/aoai-lb")")"
    stop "$LB_PID"
  done

  log "starting proxies"
  start_gateway fast "$P_LB_FAST" "$P_SIM_FAST"
  LB_FAST_PID=$LB_PID
  record "idle-aoai-lb" "$(printf '{"test":"idle","target":"aoai-lb","rss_kib":%d}' "$(mem_kib VmRSS "$LB_FAST_PID")")"
  start_gateway stream "$P_LB_STREAM" "$P_SIM_STREAM"
  LB_STREAM_PID=$LB_PID
  LB_B_PID=""
  if [[ -n $BENCH_BIN_B ]]; then
    local bin_a=$BIN
    BIN=$BENCH_BIN_B
    start_gateway fast-b "$P_LB_B" "$P_SIM_FAST"
    LB_B_PID=$LB_PID
    BIN=$bin_a
  fi
  start_nginx fast "$P_NGX_FAST" "$P_SIM_FAST" on
  NGX_FAST_PID=$NGX_PID
  start_nginx stream "$P_NGX_STREAM" "$P_SIM_STREAM" off
  NGX_STREAM_PID=$NGX_PID
  start_nginx fast-log "$P_NGX_LOG" "$P_SIM_FAST" on on
  NGX_LOG_PID=$NGX_PID
  record "idle-nginx" "$(printf '{"test":"idle","target":"nginx","rss_kib":%d,"processes":%d}' \
    "$(mem_kib VmRSS $(tree "$NGX_FAST_PID"))" "$(tree "$NGX_FAST_PID" | wc -l)")"
  if [[ $SKIP_LITELLM != 1 ]]; then
    start_litellm
  fi

  local direct="http://127.0.0.1:$P_SIM_FAST$CHAT_PATH"
  local via_lb="http://127.0.0.1:$P_LB_FAST$CHAT_PATH"
  local via_ngx="http://127.0.0.1:$P_NGX_FAST$CHAT_PATH"
  local via_ngx_log="http://127.0.0.1:$P_NGX_LOG$CHAT_PATH"
  local via_llm="http://127.0.0.1:$P_LITELLM$CHAT_PATH"
  local s_direct="http://127.0.0.1:$P_SIM_STREAM$CHAT_PATH"
  local s_lb="http://127.0.0.1:$P_LB_STREAM$CHAT_PATH"
  local s_ngx="http://127.0.0.1:$P_NGX_STREAM$CHAT_PATH"

  local r c
  for ((r = 1; r <= ROUNDS; r++)); do
    if [[ $THROUGHPUT_ONLY != 1 ]]; then
      log "round $r/$ROUNDS: light load"
      for c in 1 16; do
        light direct "$r" "$c" "$direct" "$SIM_KEY"
        light aoai-lb "$r" "$c" "$via_lb" "$CLIENT_KEY"
        light nginx "$r" "$c" "$via_ngx" "$CLIENT_KEY"
      done
    fi
    log "round $r/$ROUNDS: max throughput, 64 connections, ${DURATION}s each"
    throughput direct "$r" "$direct" "$SIM_KEY" "$SIM_FAST_PID"
    throughput aoai-lb "$r" "$via_lb" "$CLIENT_KEY" "$LB_FAST_PID"
    [[ -z $LB_B_PID ]] || throughput aoai-lb-b "$r" "http://127.0.0.1:$P_LB_B$CHAT_PATH" "$CLIENT_KEY" "$LB_B_PID"
    throughput nginx "$r" "$via_ngx" "$CLIENT_KEY" $(tree "$NGX_FAST_PID")
    throughput nginx-log "$r" "$via_ngx_log" "$CLIENT_KEY" $(tree "$NGX_LOG_PID")
    [[ $SKIP_LITELLM == 1 ]] || throughput litellm "$r" "$via_llm" "$CLIENT_KEY" $(tree "$LITELLM_PID")
    [[ $THROUGHPUT_ONLY != 1 ]] || continue
    log "round $r/$ROUNDS: $STREAMS concurrent streams"
    streams streams "$STREAMS" 1000 direct "$r" "$s_direct" "$SIM_KEY"
    streams streams "$STREAMS" 1000 aoai-lb "$r" "$s_lb" "$CLIENT_KEY" "$LB_STREAM_PID"
    streams streams "$STREAMS" 1000 nginx "$r" "$s_ngx" "$CLIENT_KEY" $(tree "$NGX_STREAM_PID")
    log "round $r/$ROUNDS: $STREAMS_LIGHT streams over ${STREAMS_LIGHT_RAMP_MS} ms (light)"
    streams streams_light "$STREAMS_LIGHT" "$STREAMS_LIGHT_RAMP_MS" direct "$r" "$s_direct" "$SIM_KEY"
    streams streams_light "$STREAMS_LIGHT" "$STREAMS_LIGHT_RAMP_MS" aoai-lb "$r" "$s_lb" "$CLIENT_KEY" "$LB_STREAM_PID"
    streams streams_light "$STREAMS_LIGHT" "$STREAMS_LIGHT_RAMP_MS" nginx "$r" "$s_ngx" "$CLIENT_KEY" $(tree "$NGX_STREAM_PID")
  done

  # Free the CPU and memory of everything but what the open-streams test needs.
  [[ -z $LB_B_PID ]] || stop "$LB_B_PID"
  stop "$LB_FAST_PID"; stop "$LB_STREAM_PID"; stop "$NGX_FAST_PID"; stop "$NGX_STREAM_PID"; stop "$NGX_LOG_PID"
  [[ -z ${LITELLM_PID:-} ]] || stop "$LITELLM_PID"
  stop "$SIM_FAST_PID"; stop "$SIM_STREAM_PID"

  if [[ $THROUGHPUT_ONLY == 1 ]]; then
    python3 "$HERE/report.py" "$RAW" "$OUT"
    log "done in $(($(date +%s) - begin)) s: $OUT/results.md"
    return
  fi
  log "open streams: $OPEN_STREAMS through aoai-lb, then through nginx"
  # Long streams (an event a second for 10 minutes) that the client closes
  # once every one of them is open at the same time. Each proxy gets its own
  # fresh process; the simulators are restarted in between so that neither
  # proxy finds the other's half-closed streams still being written to.
  start_sims open "$P_SIM_OPEN" --ttft-ms 0 --token-ms 1000 --reply-tokens 600
  SIM_OPEN_PID=$SIM_PID
  start_gateway open "$P_LB_OPEN" "$P_SIM_OPEN"
  open_streams aoai-lb "http://127.0.0.1:$P_LB_OPEN$CHAT_PATH" "$LB_PID"
  stop "$LB_PID"; stop "$SIM_OPEN_PID"
  start_sims open "$P_SIM_OPEN" --ttft-ms 0 --token-ms 1000 --reply-tokens 600
  SIM_OPEN_PID=$SIM_PID
  start_nginx open "$P_NGX_OPEN" "$P_SIM_OPEN" off off "$((2 * OPEN_STREAMS + 100))"
  NGX_OPEN_PID=$NGX_PID
  open_streams nginx "http://127.0.0.1:$P_NGX_OPEN$CHAT_PATH" $(tree "$NGX_OPEN_PID")
  stop "$NGX_OPEN_PID"; stop "$SIM_OPEN_PID"

  python3 "$HERE/report.py" "$RAW" "$OUT"
  log "done in $(($(date +%s) - begin)) s: $OUT/results.md"
}

main "$@"
