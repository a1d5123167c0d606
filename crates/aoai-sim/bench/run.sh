#!/usr/bin/env bash
# Throughput of aoai-sim for small non-streaming chat completions, keep-alive,
# the simulator pinned to one core (CPU 0) and wrk pinned to another (CPU 1).
#
# Prints, per run, wrk's requests/s and the simulator's own CPU time, then the
# median of the runs. "req per CPU-second" (requests / CPU time the simulator
# used) is the figure that stays meaningful when other work shares the core.
#
# Usage: crates/aoai-sim/bench/run.sh [runs=3] [seconds=10] [connections=32]
# Env:   NICE=-10  run the simulator and wrk at that niceness, and give this
#                  script's scheduling group (autogroup) the same priority for the
#                  run: the kernel schedules groups first, so a process's own nice
#                  value barely helps against other groups' work. Negative values
#                  need root
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=${AOAI_SIM_BIN:-$target/release/aoai-sim}
port=${PORT:-18990}
runs=${1:-3}
secs=${2:-10}
conns=${3:-32}
nice_level=${NICE:-0}

if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --release -p aoai-sim --bin aoai-sim)
fi
command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }

autogroup=/proc/$$/autogroup
saved_group=""
if [ "$nice_level" != 0 ] && [ -w "$autogroup" ]; then
  saved_group=$(awk '{print $3}' "$autogroup")
  echo "$nice_level" >"$autogroup" 2>/dev/null || saved_group=""
fi

nice -n "$nice_level" taskset -c 0 "$bin" --instances 1 --base-port "$port" --threads 1 2>/dev/null &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  if [ -n "$saved_group" ]; then echo "$saved_group" >"$autogroup" 2>/dev/null || true; fi
}
trap cleanup EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done

ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
rps_all=()
per_cpu_all=()
for i in $(seq "$runs"); do
  t0=$(ticks)
  out=$(nice -n "$nice_level" taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" -s "$here/post.lua" "http://127.0.0.1:$port")
  t1=$(ticks)
  if grep -q "Non-2xx" <<<"$out"; then
    echo "run $i: some answers were not 200:" >&2
    echo "$out" >&2
    exit 1
  fi
  rps=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN {printf "%.2f", (b - a) / hz}')
  per_cpu=$(awk -v n="$total" -v c="$cpu" 'BEGIN {if (c > 0) printf "%d", n / c; else print 0}')
  echo "run $i: ${rps} req/s (wrk), ${total} requests, simulator CPU ${cpu} s, ${per_cpu} req per CPU-second"
  rps_all+=("$rps")
  per_cpu_all+=("$per_cpu")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
echo "median: $(median "${rps_all[@]}") req/s (wrk), $(median "${per_cpu_all[@]}") req per CPU-second"
