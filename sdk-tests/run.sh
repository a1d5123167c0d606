#!/usr/bin/env bash
# The official-SDK suite: installs its own Python venv (pinned versions from
# requirements.txt), builds aoai-sim and aoai-lb, starts three simulated Azure
# OpenAI instances and the gateway in front of them (all on 127.0.0.1, free
# ports), runs pytest (and the Node test when Node.js is present), and always
# stops what it started.
#
# Usage: sdk-tests/run.sh [pytest args...]
# Env:   PYTHON       interpreter used to create the venv (default python3, >= 3.9)
#        AOAI_TARGET  gateway (default) | sim: point the clients straight at the
#                     first instance (for working on the suite itself)
#        SKIP_NODE=1  do not run the Node test
# Exit code: pytest's, or the Node test's when pytest passed.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$HERE/.venv"
LOGS="$HERE/.logs"
mkdir -p "$LOGS"

say() { printf '[sdk-tests] %s\n' "$*"; }

# ---------------------------------------------------------------- venv
req_hash="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_hash" ]; then
  say "creating venv and installing pinned packages"
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV"; then
    say "cannot create a venv with $PY: on Debian/Ubuntu install python3-venv"
    exit 2
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
  echo "$req_hash" > "$VENV/.requirements.sha256"
fi

# ---------------------------------------------------------------- binaries
AOAI_TARGET="${AOAI_TARGET:-gateway}"
if [ "$AOAI_TARGET" = gateway ]; then
  # The same target selection as `cargo test --workspace`: building only the
  # two packages resolves dependency features without the dev-dependencies
  # and recompiles a dozen crates that the test run has already built.
  say "building aoai-sim and aoai-lb"
  (cd "$ROOT" && cargo build -q --workspace --all-targets)
else
  say "building aoai-sim"
  (cd "$ROOT" && cargo build -q -p aoai-sim)
fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  TARGET_DIR="$CARGO_TARGET_DIR"
else
  TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps \
    | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
fi
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
SIM_BIN="$TARGET_DIR/debug/aoai-sim"
LB_BIN="$TARGET_DIR/debug/aoai-lb"
for b in "$SIM_BIN" $([ "$AOAI_TARGET" = gateway ] && echo "$LB_BIN"); do
  [ -x "$b" ] || { say "missing binary $b"; exit 2; }
done

# ---------------------------------------------------------------- processes
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free ports: N_SIMS consecutive ones for the instances, two more for the gateway.
N_SIMS=3
read -r SIM_BASE LB_PORT LB_ADMIN_PORT < <("$VENV/bin/python" - "$N_SIMS" <<'EOF'
import socket, sys
n = int(sys.argv[1])
def free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()
def any_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
for _ in range(200):
    base = any_port()
    if base + n < 65000 and all(free(base + i) for i in range(n)):
        break
others = []
while len(others) < 2:
    p = any_port()
    if not (base <= p < base + n) and p not in others:
        others.append(p)
print(base, *others)
EOF
)

rand() { "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))'; }
SIM_KEY="sim-$(rand)"
CLIENT_KEY="client-$(rand)"

say "starting $N_SIMS simulated instances on 127.0.0.1:$SIM_BASE.."
"$SIM_BIN" --instances "$N_SIMS" --base-port "$SIM_BASE" --api-key "$SIM_KEY" --admin \
  >"$LOGS/sim.log" 2>&1 &
PIDS+=($!)

SIM_URLS=""
for i in $(seq 0 $((N_SIMS - 1))); do
  SIM_URLS="${SIM_URLS:+$SIM_URLS,}http://127.0.0.1:$((SIM_BASE + i))"
done

# Besides API_KEY (client `default`, no limits, used by most tests), three
# named clients for test_clients.py: one request per minute, one deployment
# only, and a token limit smaller than any chat request.
LIMITED_KEY="limited-$(rand)"
NARROW_KEY="narrow-$(rand)"
SMALL_KEY="small-$(rand)"
INSTANCES="$("$VENV/bin/python" - "$SIM_URLS" "$SIM_KEY" "$LIMITED_KEY" "$NARROW_KEY" "$SMALL_KEY" <<'EOF'
import json, sys
urls, key = sys.argv[1].split(","), sys.argv[2]
limited, narrow, small = sys.argv[3:6]
print(json.dumps({
    "instances": [{"name": f"sim{i}", "url": u, "api_key": key} for i, u in enumerate(urls)],
    "clients": [
        {"name": "sdk-limited", "key": limited, "rpm": 1},
        {"name": "sdk-narrow", "key": narrow, "deployments": ["only-this-one"]},
        {"name": "sdk-small", "key": small, "tpm": 50},
    ],
}))
EOF
)"

if [ "$AOAI_TARGET" = gateway ]; then
  say "starting aoai-lb on 127.0.0.1:$LB_PORT (admin $LB_ADMIN_PORT)"
  OPENAI_INSTANCES="$INSTANCES" API_KEY="$CLIENT_KEY" HOST=127.0.0.1 PORT="$LB_PORT" \
    ADMIN_PORT="$LB_ADMIN_PORT" LOG_FORMAT=text \
    "$LB_BIN" >"$LOGS/lb.log" 2>&1 &
  PIDS+=($!)
fi

wait_http() { # url, name, pid
  local deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do
    if curl -s -o /dev/null --max-time 1 "$1"; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then say "$2 exited early:"; tail -n 20 "$LOGS/$2.log" >&2; return 1; fi
    sleep 0.1
  done
  say "$2 did not answer at $1 within 30 s"; tail -n 20 "$LOGS/$2.log" >&2; return 1
}
for i in $(seq 0 $((N_SIMS - 1))); do
  wait_http "http://127.0.0.1:$((SIM_BASE + i))/_sim/journal" sim "${PIDS[0]}"
done
if [ "$AOAI_TARGET" = gateway ]; then
  wait_http "http://127.0.0.1:$LB_PORT/health" lb "${PIDS[1]}"
fi

export AOAI_GATEWAY_URL="http://127.0.0.1:$LB_PORT"
export AOAI_GATEWAY_ADMIN_URL="http://127.0.0.1:$LB_ADMIN_PORT"
export AOAI_CLIENT_KEY="$CLIENT_KEY"
export AOAI_LIMITED_KEY="$LIMITED_KEY" AOAI_NARROW_KEY="$NARROW_KEY" AOAI_SMALL_KEY="$SMALL_KEY"
export AOAI_SIM_URLS="$SIM_URLS"
export AOAI_SIM_KEY="$SIM_KEY"
export AOAI_TARGET
# test_entra.py starts its own keyless instance and gateway from these.
if [ "$AOAI_TARGET" = gateway ]; then
  export AOAI_SIM_BIN="$SIM_BIN" AOAI_LB_BIN="$LB_BIN"
fi

# ---------------------------------------------------------------- tests
say "running pytest (target: $AOAI_TARGET)"
set +e
(cd "$HERE" && "$VENV/bin/python" -m pytest "$@")
rc=$?
set -e

if [ "${SKIP_NODE:-0}" != "1" ]; then
  if [ "$AOAI_TARGET" != gateway ]; then
    say "target is not the gateway: skipping the Node test"
  elif command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    say "running the Node test (node $(node --version))"
    set +e
    (
      cd "$HERE/node"
      # npm ci deletes and reinstalls node_modules: only when the lock changed.
      lock_hash="$(sha256sum package-lock.json | cut -d' ' -f1)"
      if [ "$(cat node_modules/.lock.sha256 2>/dev/null)" != "$lock_hash" ]; then
        npm ci --silent --no-audit --no-fund || exit
        echo "$lock_hash" > node_modules/.lock.sha256
      fi
      node --test
    )
    node_rc=$?
    set -e
    [ "$rc" -eq 0 ] && rc=$node_rc
  else
    say "Node.js not found: skipping the Node test"
  fi
fi

exit "$rc"
