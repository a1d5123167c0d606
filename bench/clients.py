#!/usr/bin/env python3
"""CPU per request of aoai-lb with 100 named clients next to the same
gateway with only API_KEY, in one run, against one aoai-sim pair.

Started by bench/clients.sh, which builds the binaries. For each round it
starts both gateways (one after the other, same simulator), sends the same
number of small non-streaming chat requests over keep-alive connections from
a few threads, and reads the gateway's utime+stime from /proc before and
after. Usage parsing is on in both (it is always on). The limited client
has rpm and tpm far above the load, so every request goes through the full
admission path (tokenizer estimate, window bookkeeping, settlement) and is
admitted.

Everything listens on 127.0.0.1; every process started here is stopped by
its process id; each load step is bounded by its request count and a
timeout.
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

BIN = sys.argv[1]
ROUNDS = int(os.environ.get("ROUNDS", "5"))
REQUESTS = int(os.environ.get("REQUESTS", "4000"))
THREADS = int(os.environ.get("THREADS", "4"))
SIM_PORT = int(os.environ.get("SIM_PORT", "18600"))
LB_PORT = int(os.environ.get("LB_PORT", "18700"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = json.dumps({"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16})
PATH = "/openai/deployments/bench-chat/chat/completions?api-version=2024-10-21"
API_KEY = "sk-bench-client"


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/healthz")
            c.getresponse().read()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never answered")


def document(clients):
    doc = {
        "instances": [
            {"name": f"sim{i}", "url": f"http://127.0.0.1:{SIM_PORT + i}", "api_key": "sim-key"}
            for i in range(2)
        ]
    }
    if clients:
        doc["clients"] = [
            {"name": f"team-{i:03}", "key": f"sk-team-{i:03}",
             "deployments": ["bench-chat", "other"], "rpm": 10_000_000, "tpm": 10_000_000_000}
            for i in range(clients)
        ]
    return json.dumps(doc)


def load(key):
    per = REQUESTS // THREADS
    errors = []

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", LB_PORT, timeout=30)
        for _ in range(per):
            c.request("POST", PATH, BODY, {"api-key": key, "content-type": "application/json"})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(r.status)
    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return per * THREADS


def measure(label, clients, key):
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "OPENAI_INSTANCES")}
    env.update({"OPENAI_INSTANCES": document(clients), "API_KEY": API_KEY, "HOST": "127.0.0.1",
                "PORT": str(LB_PORT), "ADMIN_PORT": str(LB_PORT + 1), "RUST_LOG": "warn"})
    lb = subprocess.Popen([f"{BIN}/aoai-lb"], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_port(LB_PORT)
        load(key)  # warm-up: connections, tokenizer, metric handles
        c0 = cpu_ticks(lb.pid)
        t0 = time.monotonic()
        n = load(key)
        wall = time.monotonic() - t0
        c1 = cpu_ticks(lb.pid)
    finally:
        lb.terminate()
        lb.wait(timeout=30)
    us = (c1 - c0) / CLK_TCK / n * 1e6
    return {"label": label, "requests": n, "cpu_us_per_request": us, "req_per_s": n / wall}


def main():
    sim = subprocess.Popen([f"{BIN}/aoai-sim", "--instances", "2", "--base-port", str(SIM_PORT),
                            "--api-key", "sim-key"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        rows = {"api_key_only": [], "100_clients": []}
        for r in range(ROUNDS):
            # Alternate the order so drift on a noisy machine hits both.
            order = [("api_key_only", 0, API_KEY), ("100_clients", 100, "sk-team-057")]
            if r % 2:
                order.reverse()
            for label, clients, key in order:
                rows[label].append(measure(label, clients, key))
    finally:
        sim.terminate()
        sim.wait(timeout=30)
    out = {}
    for label, runs in rows.items():
        out[label] = {
            "cpu_us_per_request_median": statistics.median(x["cpu_us_per_request"] for x in runs),
            "req_per_s_median": statistics.median(x["req_per_s"] for x in runs),
            "runs": runs,
        }
    out["ratio_100_clients_over_api_key_only"] = (
        out["100_clients"]["cpu_us_per_request_median"] / out["api_key_only"]["cpu_us_per_request_median"])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
