#!/usr/bin/env python3
"""Rate-limit-aware routing, side by side in one run (issue 10).

Started by bench/steer.sh, which builds the binaries and the virtualenv.
For each load level (OFFERED, default 0.8, 1.0 and 1.3 times the combined
capacity) every configuration runs at the same time, each in front of its
own three simulator instances with Azure's admission model (rolling 60 s
token reservations of prompt estimate + max_tokens, RPM / 6 per 10 s):

- aoai-lb with steering and the lanes' tpm/rpm configured ("steer");
- aoai-lb with steering and no configured limits, so it learns them from
  the headers ("steer-learned");
- aoai-lb with "routing": {"rate_limit_aware": false} ("plain");
- the LiteLLM proxy with routing_strategy usage-based-routing-v2 and the
  same tpm/rpm per deployment ("litellm"), unless SKIP_LITELLM=1.

Every configuration gets the same arrival schedule (Poisson, seeded), the
same prompts and max_tokens, sent with the official openai SDK's
AsyncAzureOpenAI (its own retries: 2, honouring retry-after-ms), from
CLIENTS client objects. Upstream 429s are counted in the simulators'
journals, so every configuration is counted the same way.

Everything listens on 127.0.0.1; every process started here is stopped by
its process id; each run is bounded by DURATION plus a drain timeout.
"""
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

BIN = sys.argv[1]
VENV = sys.argv[2]
OUT = sys.argv[3]
OFFERED = [float(x) for x in os.environ.get("OFFERED", "0.8,1.0,1.3").split(",")]
DURATION = float(os.environ.get("DURATION", "180"))
# Per-instance quotas: TPMS="90000,60000,30000" gives unequal deployments
# (RPM follows Azure's 6 per 1,000 TPM unless RPM is set); else TPM each.
TPMS = [int(x) for x in os.environ.get("TPMS", os.environ.get("TPM", "60000")).split(",")]
INSTANCES = int(os.environ.get("INSTANCES", "3")) if len(TPMS) == 1 else len(TPMS)
TPMS = TPMS * INSTANCES if len(TPMS) == 1 else TPMS
RPMS = [int(os.environ["RPM"]) if "RPM" in os.environ else t * 6 // 1000 for t in TPMS]
CLIENTS = int(os.environ.get("CLIENTS", "32"))
SEED = int(os.environ.get("SEED", "10"))
SKIP_LITELLM = os.environ.get("SKIP_LITELLM", "0") == "1"
BASE_PORT = int(os.environ.get("BASE_PORT", "19300"))
TTFT_MS = os.environ.get("TTFT_MS", "200")
TOKEN_MS = os.environ.get("TOKEN_MS", "5")
REPLY_TOKENS = os.environ.get("REPLY_TOKENS", "64")
DEPLOYMENT = "bench-chat"
API_VERSION = "2024-10-21"
SIM_KEY = "sim-key"
CLIENT_KEY = "sk-bench-client"
# Realistic chat shapes: prompts of 100-900 tokens (about 4 characters
# each), max_tokens among common caps.
PROMPT_TOKENS = (100, 900)
MAX_TOKENS = [100, 200, 400, 800]
WORDS = "the quick brown fox jumps over a lazy dog while seven tired engineers watch".split()

procs = []


def log(msg):
    print(f"[steer-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(name, args, env=None, cwd=None):
    logf = open(os.path.join(OUT, "logs", f"{name}.log"), "w")
    p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    procs.append(p)
    return p


def stop_all():
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    procs.clear()


def wait_http(url, timeout=120, headers=None):
    end = time.time() + timeout
    while time.time() < end:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def sim_estimate(prompt_chars, max_tokens):
    # The simulator's (and Azure's) character-based admission estimate.
    return -(-prompt_chars // 4) + max_tokens


def workload(rate_per_s, seed):
    """The arrival schedule: (time offset, prompt, max_tokens)."""
    rnd = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rnd.expovariate(rate_per_s)
        if t >= DURATION:
            return out
        tokens = rnd.randint(*PROMPT_TOKENS)
        words = []
        chars = 0
        while chars < tokens * 4:
            w = rnd.choice(WORDS)
            words.append(w)
            chars += len(w) + 1
        out.append((t, " ".join(words), rnd.choice(MAX_TOKENS)))


def mean_estimate(seed):
    rnd = random.Random(seed + 1)
    xs = []
    for _ in range(4000):
        tokens = rnd.randint(*PROMPT_TOKENS)
        xs.append(sim_estimate(tokens * 4 + 2, rnd.choice(MAX_TOKENS)))
    return statistics.mean(xs)


def gateway_doc(sim_port, lanes, aware):
    instances = []
    for i in range(INSTANCES):
        inst = {"name": f"sim{i}", "url": f"http://127.0.0.1:{sim_port + i}", "api_key": SIM_KEY}
        if lanes:
            inst["deployments"] = {DEPLOYMENT: {"name": DEPLOYMENT, "tpm": TPMS[i], "rpm": RPMS[i]}}
        instances.append(inst)
    return json.dumps({"instances": instances, "routing": {"rate_limit_aware": aware}})


def litellm_config(sim_port, path):
    lines = ["model_list:"]
    for i in range(INSTANCES):
        lines += [
            f"  - model_name: {DEPLOYMENT}",
            "    litellm_params:",
            f"      model: azure/{DEPLOYMENT}",
            f"      api_base: http://127.0.0.1:{sim_port + i}",
            f"      api_key: {SIM_KEY}",
            f'      api_version: "{API_VERSION}"',
            f"      tpm: {TPMS[i]}",
            f"      rpm: {RPMS[i]}",
            "    model_info:",
            "      base_model: azure/gpt-4o-mini",
        ]
    lines += [
        "router_settings:",
        "  routing_strategy: usage-based-routing-v2",
        "litellm_settings:",
        "  telemetry: false",
        "general_settings:",
        f"  master_key: {CLIENT_KEY}",
        "  disable_spend_logs: true",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def start_config(name, idx, level_idx):
    """Starts one configuration's simulators and proxy; returns its URL
    and simulator base port."""
    base = BASE_PORT + level_idx * 100 + idx * 20
    sim_port, lb_port, admin_port = base, base + 10, base + 11
    sim_cfg = os.path.join(OUT, f"{name}-{level_idx}-sims.json")
    with open(sim_cfg, "w") as f:
        json.dump([{"name": f"sim{i}", "rate_limit": {"rpm": RPMS[i], "tpm": TPMS[i]}}
                   for i in range(INSTANCES)], f)
    start(
        f"{name}-{level_idx}-sim",
        [
            f"{BIN}/aoai-sim", "--config", sim_cfg, "--base-port", str(sim_port),
            "--api-key", SIM_KEY, "--admin",
            "--ttft-ms", TTFT_MS, "--token-ms", TOKEN_MS, "--reply-tokens", REPLY_TOKENS,
            "--threads", "1",
        ],
    )
    for i in range(INSTANCES):
        wait_http(f"http://127.0.0.1:{sim_port + i}/_sim/journal")
    if name == "litellm":
        d = tempfile.mkdtemp(prefix="steer-litellm-", dir=OUT)
        cfg = os.path.join(d, "config.yaml")
        litellm_config(sim_port, cfg)
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
                   LITELLM_TELEMETRY="False")
        start(f"{name}-{level_idx}-proxy",
              [f"{VENV}/bin/litellm", "--config", cfg, "--host", "127.0.0.1",
               "--port", str(lb_port), "--num_workers", "1"], env=env, cwd=d)
        wait_http(f"http://127.0.0.1:{lb_port}/health/readiness", timeout=180)
    else:
        doc = gateway_doc(sim_port, name != "steer-learned", name != "plain")
        env = dict(os.environ, OPENAI_INSTANCES=doc, API_KEY=CLIENT_KEY, PORT=str(lb_port),
                   ADMIN_PORT=str(admin_port), HOST="127.0.0.1", LOG_LEVEL="warn")
        start(f"{name}-{level_idx}-proxy", [f"{BIN}/aoai-lb"], env=env)
        wait_http(f"http://127.0.0.1:{lb_port}/readyz")
    return f"http://127.0.0.1:{lb_port}", sim_port


def journal_counts(sim_port):
    c = {"attempts": 0, "throttled": 0, "ok": 0}
    for i in range(INSTANCES):
        with urllib.request.urlopen(f"http://127.0.0.1:{sim_port + i}/_sim/journal", timeout=10) as r:
            j = json.load(r)
        for e in j["entries"]:
            c["attempts"] += 1
            if e["status"] == 429:
                c["throttled"] += 1
            elif e["status"] == 200:
                c["ok"] += 1
    return c


async def run_config(url, schedule, t0):
    clients = [
        openai.AsyncAzureOpenAI(azure_endpoint=url, api_key=CLIENT_KEY, api_version=API_VERSION,
                                max_retries=2, timeout=120)
        for _ in range(CLIENTS)
    ]
    results = []

    async def one(k, at, prompt, max_tokens):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        start = time.monotonic()
        try:
            r = await clients[k % CLIENTS].chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens)
            tokens = r.usage.total_tokens if r.usage else 0
            results.append((True, time.monotonic() - start, tokens, None))
        except openai.APIStatusError as e:
            results.append((False, time.monotonic() - start, 0, e.status_code))
        except Exception as e:  # connection errors, timeouts
            results.append((False, time.monotonic() - start, 0, type(e).__name__))

    await asyncio.gather(*(one(k, *w) for k, w in enumerate(schedule)))
    for c in clients:
        await c.close()
    return results


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def level(level_idx, offered, configs, est):
    rate = offered * sum(TPMS) / est / 60.0
    schedule = workload(rate, SEED + level_idx)
    log(f"level {offered}x: {len(schedule)} requests over {DURATION:.0f} s ({rate:.2f}/s)")
    started = {name: start_config(name, i, level_idx) for i, name in enumerate(configs)}
    t0 = time.monotonic() + 1.0
    runs = await asyncio.gather(*(run_config(started[n][0], schedule, t0) for n in configs))
    wall = time.monotonic() - t0
    rows = {}
    for name, res in zip(configs, runs):
        j = journal_counts(started[name][1])
        ok = [r for r in res if r[0]]
        errs = [r for r in res if not r[0]]
        lat = [r[1] for r in ok]
        rows[name] = {
            "offered": offered,
            "requests": len(res),
            "upstream_attempts": j["attempts"],
            "upstream_429": j["throttled"],
            "upstream_429_per_1000_requests": round(1000 * j["throttled"] / max(1, len(res)), 1),
            "client_errors": len(errs),
            "client_error_kinds": sorted({str(e[3]) for e in errs}),
            "tokens_served_per_min": round(sum(r[2] for r in ok) / (wall / 60.0)),
            "p50_s": round(pct(lat, 0.5), 3) if lat else None,
            "p99_s": round(pct(lat, 0.99), 3) if lat else None,
            "wall_s": round(wall, 1),
        }
        log(f"  {name}: {rows[name]}")
    stop_all()
    return rows


def main():
    os.makedirs(os.path.join(OUT, "logs"), exist_ok=True)
    configs = ["steer", "steer-learned", "plain"] + ([] if SKIP_LITELLM else ["litellm"])
    est = mean_estimate(SEED)
    log(f"{INSTANCES} instances, TPM {TPMS}, RPM {RPMS}; mean Azure-style estimate {est:.0f} tokens")
    out = {"tpm": TPMS, "rpm": RPMS, "instances": INSTANCES, "duration_s": DURATION,
           "mean_estimate": round(est), "clients": CLIENTS, "seed": SEED, "levels": []}
    try:
        for i, o in enumerate(OFFERED):
            out["levels"].append(asyncio.run(level(i, o, configs, est)))
    finally:
        stop_all()
    with open(os.path.join(OUT, "steer.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"| offered | configuration | requests | upstream 429s | per 1,000 requests | client errors | tokens/min served | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lv in out["levels"]:
        for name, r in lv.items():
            print(f"| {r['offered']}x | {name} | {r['requests']} | {r['upstream_429']} | "
                  f"{r['upstream_429_per_1000_requests']} | {r['client_errors']} | "
                  f"{r['tokens_served_per_min']:,} | {r['p50_s']} | {r['p99_s']} |")


if __name__ == "__main__":
    main()
