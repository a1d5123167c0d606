#!/usr/bin/env python3
"""Turns bench/out/raw/*.json into results.json and results.md.

Every figure is a median over the rounds of the run. Every ratio and every
"added" latency is computed within one round (the gateway and its reference
measured minutes apart on the same machine) and then the median is taken, so
that drift on a shared host cancels as far as it can.

Usage: report.py RAW_DIR OUT_DIR
"""

import glob
import json
import os
import statistics
import sys

TARGETS_NOTE = {
    "throughput": "req/s >= nginx",
    "cpu": "CPU per request <= nginx",
    "light": "added p50 and p99 <= nginx, at 1 and 16 connections",
    "ttfb": "added time to first byte <= 1 ms",
    "throughput_log": "req/s >= nginx with its access log on",
    "cpu_log": "CPU per request <= nginx with its access log on",
    "per_stream": "<= 10 KiB per open stream",
    "settle": "RSS within 20% of idle, 10 s after the open streams end",
    "idle": "idle RSS <= 15 MB",
    "peak": "peak RSS at max throughput <= 1.5x nginx",
}
IDLE_LIMIT_KIB = 15_000_000 / 1024  # 15 MB, decimal, as the issue states it


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load(raw):
    runs = []
    for path in sorted(glob.glob(os.path.join(raw, "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def wrk_ok(w):
    return w["requests"] > 0 and not any(w["errors"].values())


def rps(w):
    return w["requests"] * 1e6 / w["duration_us"] if w["duration_us"] else 0.0


def summarize(runs):
    res = {"machine": next((r for r in runs if "nproc" in r), {})}
    by = {}
    for r in runs:
        by.setdefault(r.get("test"), []).append(r)

    # a. max throughput
    tp = {}
    rounds = sorted({r["round"] for r in by.get("throughput", [])})
    per_round = {}
    for r in by.get("throughput", []):
        w = r["wrk"]
        row = {
            "valid": wrk_ok(w),
            "rps": rps(w),
            "p50_us": w["latency_us"]["p50"],
            "p99_us": w["latency_us"]["p99"],
            "cpu_us_per_req": (r["cpu_ticks"] / r["clk_tck"] * 1e6 / w["requests"])
            if w["requests"]
            else None,
            "user_us_per_req": (r.get("user_ticks", 0) / r["clk_tck"] * 1e6 / w["requests"])
            if w["requests"] and "user_ticks" in r
            else None,
            "sim_cpu_us_per_req": (r["sim_cpu_ticks"] / r["clk_tck"] * 1e6 / w["requests"])
            if w["requests"]
            else None,
            "server_cpu_util": r["cpu_ticks"] / r["clk_tck"] / (r["wall_ns"] / 1e9),
            "peak_rss_kib": r["hwm_kib"],
        }
        per_round.setdefault(r["round"], {})[r["target"]] = row
        tp.setdefault(r["target"], []).append(row)
    res["throughput"] = {
        t: {k: med([row[k] for row in rows]) for k in rows[0] if k != "valid"}
        | {"valid_rounds": sum(row["valid"] for row in rows), "rounds": len(rows)}
        for t, rows in tp.items()
    }

    def ratio(a, b, key):
        vals = []
        for rnd in rounds:
            x, y = per_round[rnd].get(a), per_round[rnd].get(b)
            if x and y and x[key] and y[key]:
                vals.append(x[key] / y[key])
        return med(vals)

    res["ratios"] = {
        "rps_lb_over_nginx": ratio("aoai-lb", "nginx", "rps"),
        "rps_lb_over_litellm": ratio("aoai-lb", "litellm", "rps"),
        "rps_lb_over_direct": ratio("aoai-lb", "direct", "rps"),
        "cpu_lb_over_nginx": ratio("aoai-lb", "nginx", "cpu_us_per_req"),
        "rps_lb_over_nginx_log": ratio("aoai-lb", "nginx-log", "rps"),
        "rps_lb_b_over_nginx": ratio("aoai-lb-b", "nginx", "rps"),
        "cpu_lb_b_over_nginx": ratio("aoai-lb-b", "nginx", "cpu_us_per_req"),
        "rps_lb_b_over_lb": ratio("aoai-lb-b", "aoai-lb", "rps"),
        "cpu_lb_b_over_lb": ratio("aoai-lb-b", "aoai-lb", "cpu_us_per_req"),
        "cpu_lb_over_nginx_log": ratio("aoai-lb", "nginx-log", "cpu_us_per_req"),
        "cpu_lb_over_litellm": ratio("aoai-lb", "litellm", "cpu_us_per_req"),
        "peak_rss_lb_over_nginx": ratio("aoai-lb", "nginx", "peak_rss_kib"),
    }

    # b. light load: added latency over direct, same round
    light = {}
    for conns in sorted({r["conns"] for r in by.get("light", [])}):
        rows = [r for r in by["light"] if r["conns"] == conns]
        direct = {r["round"]: r["wrk"] for r in rows if r["target"] == "direct"}
        out = {}
        for target in sorted({r["target"] for r in rows}):
            mine = [r for r in rows if r["target"] == target]
            entry = {
                "p50_us": med([r["wrk"]["latency_us"]["p50"] for r in mine]),
                "p99_us": med([r["wrk"]["latency_us"]["p99"] for r in mine]),
                "rps": med([rps(r["wrk"]) for r in mine]),
                "valid_rounds": sum(wrk_ok(r["wrk"]) for r in mine),
            }
            if target != "direct":
                for q in ("p50", "p99"):
                    entry[f"added_{q}_us"] = med(
                        [
                            r["wrk"]["latency_us"][q] - direct[r["round"]]["latency_us"][q]
                            for r in mine
                            if r["round"] in direct
                        ]
                    )
            out[target] = entry
        light[f"c{conns}"] = out
    res["light"] = light

    # c. streams (1,000 concurrent) and streams_light
    res["streams"] = stream_summary(by.get("streams", []))
    res["streams_light"] = stream_summary(by.get("streams_light", []))

    # d. open streams, one record per proxy
    res["open_streams"] = {}
    for o in by.get("open_streams", []):
        n = o["client"]["max_open"] or o["streams"]
        settle = o.get("rss_after_settle_kib")
        res["open_streams"][o.get("target", "aoai-lb")] = {
            "streams": o["streams"],
            "max_open": o["client"]["max_open"],
            "outcomes": o["client"]["outcomes"],
            "idle_rss_kib": o["idle_rss_kib"],
            "rss_at_all_open_kib": o["rss_at_all_open_kib"],
            "peak_rss_kib": o["hwm_kib"],
            "rss_after_close_kib": o["rss_after_close_kib"],
            "rss_after_settle_kib": settle,
            "settle_s": o.get("settle_s"),
            "cold_idle_rss_kib": o.get("cold_idle_rss_kib"),
            "warm_streams": o.get("warm_streams"),
            "settle_over_idle": settle / o["idle_rss_kib"] if settle and o["idle_rss_kib"] else None,
            "kib_per_stream": (o["hwm_kib"] - o["idle_rss_kib"]) / n if n else None,
            "nofile": o["nofile"],
        }

    # e. footprint
    fp = by.get("footprint", [])
    idle = {r["target"]: r for r in by.get("idle", [])}
    res["footprint"] = {
        "starts": len(fp),
        "ready_ms": med([r["ready"]["ready_ms"] for r in fp]),
        "idle_rss_kib": med([r["idle_rss_kib"] for r in fp]),
        "binary_bytes": fp[0]["binary_bytes"] if fp else None,
        "nginx_idle_rss_kib": idle.get("nginx", {}).get("rss_kib"),
    }

    res["targets"] = targets(res)
    return res


def stream_summary(st):
    direct = {r["round"]: r["client"] for r in st if r["target"] == "direct"}
    streams = {}
    for target in sorted({r["target"] for r in st}):
        mine = [r for r in st if r["target"] == target]
        c = [r["client"] for r in mine]
        entry = {
            "completed": med([x["outcomes"].get("completed", 0) for x in c]),
            "streams": c[0]["streams"],
            "max_open": med([x["max_open"] for x in c]),
            "ttfb_p50_us": med([x["ttfb_us"].get("p50") for x in c]),
            "ttfb_p99_us": med([x["ttfb_us"].get("p99") for x in c]),
            "gap_p50_us": med([x["gap_us"].get("p50") for x in c]),
            "gap_p99_us": med([x["gap_us"].get("p99") for x in c]),
            "gap_dev_p99_us": med([x["gap_dev_us"].get("p99") for x in c]),
            "gap_dev_max_us": med([x["gap_dev_us"].get("max") for x in c]),
            "events_p50": med([x["events_per_stream"].get("p50") for x in c]),
            "peak_rss_kib": med([r["hwm_kib"] for r in mine]) if target != "direct" else None,
            "cpu_us_per_stream": med(
                [r["cpu_ticks"] / r["clk_tck"] * 1e6 / r["client"]["streams"] for r in mine]
            )
            if target != "direct"
            else None,
        }
        if target != "direct":
            for q in ("p50", "p99"):
                entry[f"added_ttfb_{q}_us"] = med(
                    [
                        r["client"]["ttfb_us"].get(q) - direct[r["round"]]["ttfb_us"].get(q)
                        for r in mine
                        if r["round"] in direct
                        and r["client"]["ttfb_us"].get(q) is not None
                        and direct[r["round"]]["ttfb_us"].get(q) is not None
                    ]
                )
            entry["added_gap_dev_p99_us"] = med(
                [
                    r["client"]["gap_dev_us"].get("p99") - direct[r["round"]]["gap_dev_us"].get("p99")
                    for r in mine
                    if r["round"] in direct
                    and r["client"]["gap_dev_us"].get("p99") is not None
                    and direct[r["round"]]["gap_dev_us"].get("p99") is not None
                ]
            )
        streams[target] = entry
    return streams


def targets(res):
    t = []
    ra, lt = res["ratios"], res["light"]

    def add(key, figure, ok):
        t.append({"target": TARGETS_NOTE[key], "figure": figure, "met": ok})

    r = ra.get("rps_lb_over_nginx")
    add("throughput", f"aoai-lb/nginx req/s = {fmt(r, 2)}", r is not None and r >= 1.0)
    r = ra.get("cpu_lb_over_nginx")
    tpv = res["throughput"]
    add(
        "cpu",
        f"{fmt(tpv.get('aoai-lb', {}).get('cpu_us_per_req'), 1)} µs vs "
        f"{fmt(tpv.get('nginx', {}).get('cpu_us_per_req'), 1)} µs (ratio {fmt(r, 2)})",
        r is not None and r <= 1.0,
    )
    if "nginx-log" in tpv:
        r = ra.get("rps_lb_over_nginx_log")
        add("throughput_log", f"aoai-lb/nginx-log req/s = {fmt(r, 2)}", r is not None and r >= 1.0)
        r = ra.get("cpu_lb_over_nginx_log")
        add(
            "cpu_log",
            f"{fmt(tpv.get('aoai-lb', {}).get('cpu_us_per_req'), 1)} µs vs "
            f"{fmt(tpv.get('nginx-log', {}).get('cpu_us_per_req'), 1)} µs (ratio {fmt(r, 2)})",
            r is not None and r <= 1.0,
        )
    parts, ok = [], True
    for c, rows in lt.items():
        lb, ng = rows.get("aoai-lb", {}), rows.get("nginx", {})
        for q in ("p50", "p99"):
            a, b = lb.get(f"added_{q}_us"), ng.get(f"added_{q}_us")
            parts.append(f"{c} {q} +{fmt(a, 0)} vs +{fmt(b, 0)} µs")
            ok = ok and a is not None and b is not None and a <= b
    add("light", "; ".join(parts), ok and bool(parts))
    s = res["streams"].get("aoai-lb", {})
    n = res["streams"].get("nginx", {})
    sl = res.get("streams_light", {}).get("aoai-lb", {})
    a50, a99 = s.get("added_ttfb_p50_us"), s.get("added_ttfb_p99_us")
    add(
        "ttfb",
        f"{s.get('streams')} streams: p50 +{fmt(a50, 0)} µs, p99 +{fmt(a99, 0)} µs "
        f"(nginx +{fmt(n.get('added_ttfb_p50_us'), 0)} / +{fmt(n.get('added_ttfb_p99_us'), 0)} µs); "
        f"light: p50 +{fmt(sl.get('added_ttfb_p50_us'), 0)} µs",
        a50 is not None and a50 <= 1000,
    )
    o = res.get("open_streams", {}).get("aoai-lb", {})
    on = res.get("open_streams", {}).get("nginx", {})
    k = o.get("kib_per_stream")
    add(
        "per_stream",
        f"{fmt(k, 1)} KiB at {o.get('max_open')} open (nginx {fmt(on.get('kib_per_stream'), 1)} KiB "
        f"at {on.get('max_open')} open)",
        k is not None and k <= 10,
    )
    q = o.get("settle_over_idle")
    add(
        "settle",
        f"{fmt(kib_mib(o.get('rss_after_settle_kib')), 1)} MiB vs {fmt(kib_mib(o.get('idle_rss_kib')), 1)} MiB idle "
        f"(ratio {fmt(q, 2)}; nginx {fmt(on.get('settle_over_idle'), 2)})",
        q is not None and q <= 1.2,
    )
    i = res["footprint"].get("idle_rss_kib")
    add("idle", f"{fmt(i / 1024 if i else None, 1)} MiB", i is not None and i <= IDLE_LIMIT_KIB)
    r = ra.get("peak_rss_lb_over_nginx")
    add(
        "peak",
        f"{fmt(kib_mib(tpv.get('aoai-lb', {}).get('peak_rss_kib')), 1)} MiB vs "
        f"{fmt(kib_mib(tpv.get('nginx', {}).get('peak_rss_kib')), 1)} MiB (ratio {fmt(r, 2)})",
        r is not None and r <= 1.5,
    )
    return t


def kib_mib(v):
    return v / 1024 if v is not None else None


def fmt(v, digits):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def markdown(res):
    m = res["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"- Date: {m.get('date')}",
        f"- Machine: {m.get('nproc')} CPUs, {m.get('cpu')}, kernel {m.get('kernel')}, "
        f"{fmt(m.get('mem_kib', 0) / 1048576, 1)} GiB",
        f"- Versions: {m.get('rustc')}; {m.get('nginx')}; {m.get('wrk')}; LiteLLM {m.get('litellm')}",
        f"- Command: `{m.get('command')}`; open-files limit {m.get('nofile')}; revision {m.get('revision')}",
        "",
        "## Targets",
        "",
        "| Target | Figure | Met |",
        "|---|---|---|",
    ]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else '**no**'} |")

    lines += [
        "",
        "## a. Non-streaming chat, 64 connections, max throughput",
        "",
        "| Target | req/s | p50 ms | p99 ms | server CPU µs/req | of which user | server CPU use | sim CPU µs/req | peak RSS MiB | valid rounds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in ("direct", "aoai-lb", "aoai-lb-b", "nginx", "nginx-log", "litellm"):
        r = res["throughput"].get(t)
        if not r:
            continue
        lines.append(
            f"| {t} | {fmt(r['rps'], 0)} | {fmt(r['p50_us'] / 1000, 2)} | {fmt(r['p99_us'] / 1000, 2)} | "
            f"{fmt(r['cpu_us_per_req'], 1)} | {fmt(r.get('user_us_per_req'), 1)} | {fmt(r['server_cpu_util'] * 100, 0)}% | "
            f"{fmt(r['sim_cpu_us_per_req'], 1)} | {fmt(kib_mib(r['peak_rss_kib']), 1)} | "
            f"{r['valid_rounds']}/{r['rounds']} |"
        )
    ra = res["ratios"]
    lines += [
        "",
        f"Ratios (median of per-round ratios): req/s aoai-lb/nginx **{fmt(ra['rps_lb_over_nginx'], 2)}**, "
        f"aoai-lb/LiteLLM **{fmt(ra['rps_lb_over_litellm'], 1)}**, aoai-lb/direct {fmt(ra['rps_lb_over_direct'], 2)}; "
        f"CPU per request aoai-lb/nginx **{fmt(ra['cpu_lb_over_nginx'], 2)}**, "
        f"against nginx with its access log on: req/s **{fmt(ra.get('rps_lb_over_nginx_log'), 2)}**, "
        f"CPU per request **{fmt(ra.get('cpu_lb_over_nginx_log'), 2)}**; "
        f"aoai-lb/LiteLLM {fmt(ra['cpu_lb_over_litellm'], 3)}; "
        f"peak RSS aoai-lb/nginx {fmt(ra['peak_rss_lb_over_nginx'], 2)}.",
        "",
        "For direct, 'server' is the simulator process itself; nginx-log is nginx with "
        "`access_log` to a file in the `combined` format.",
    ]
    if "aoai-lb-b" in res["throughput"]:
        lines += [
            "",
            f"aoai-lb-b (`BENCH_BIN_B`): req/s vs nginx **{fmt(ra.get('rps_lb_b_over_nginx'), 2)}**, "
            f"CPU per request vs nginx **{fmt(ra.get('cpu_lb_b_over_nginx'), 2)}**; "
            f"against aoai-lb: req/s {fmt(ra.get('rps_lb_b_over_lb'), 2)}, "
            f"CPU per request {fmt(ra.get('cpu_lb_b_over_lb'), 2)} (medians of per-round ratios).",
        ]
    lines += [
        "",
        "## b. Light load: latency added over going direct",
        "",
        "| Connections | Target | p50 µs | p99 µs | added p50 µs | added p99 µs | req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, rows in res["light"].items():
        for t in ("direct", "aoai-lb", "nginx"):
            r = rows.get(t)
            if not r:
                continue
            lines.append(
                f"| {c[1:]} | {t} | {fmt(r['p50_us'], 0)} | {fmt(r['p99_us'], 0)} | "
                f"{fmt(r.get('added_p50_us'), 0) if t != 'direct' else '-'} | "
                f"{fmt(r.get('added_p99_us'), 0) if t != 'direct' else '-'} | {fmt(r['rps'], 0)} |"
            )
    for key, title in (
        ("streams", "## c. Concurrent SSE streams"),
        ("streams_light", "## c'. SSE streams at light load"),
    ):
        rows = res.get(key, {})
        if not rows:
            continue
        n = next(iter(rows.values()))["streams"]
        lines += [
            "",
            f"{title} ({n} streams)",
            "",
            "| Target | completed | TTFB p50 ms | TTFB p99 ms | added TTFB p50 µs | added TTFB p99 µs | gap p50 ms | gap p99 ms | gap deviation p99 ms | peak RSS MiB | CPU µs/stream |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in ("direct", "aoai-lb", "nginx"):
            r = rows.get(t)
            if not r:
                continue
            lines.append(
                f"| {t} | {fmt(r['completed'], 0)}/{r['streams']} | {fmt(r['ttfb_p50_us'] / 1000, 2)} | "
                f"{fmt(r['ttfb_p99_us'] / 1000, 2)} | {fmt(r.get('added_ttfb_p50_us'), 0) if t != 'direct' else '-'} | "
                f"{fmt(r.get('added_ttfb_p99_us'), 0) if t != 'direct' else '-'} | "
                f"{fmt(r['gap_p50_us'] / 1000, 2)} | {fmt(r['gap_p99_us'] / 1000, 2)} | "
                f"{fmt(r['gap_dev_p99_us'] / 1000, 2)} | {fmt(kib_mib(r['peak_rss_kib']), 1)} | "
                f"{fmt(r['cpu_us_per_stream'], 0)} |"
            )
    ops = res.get("open_streams") or {}
    if ops:
        lines += [
            "",
            "## d. Concurrent open streams",
            "",
            "| Target | requested | open at once | outcomes | cold / idle RSS MiB | all open MiB | peak MiB | "
            "KiB per open stream | 2 s after MiB | settled MiB (s) | settled / idle |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for t in ("aoai-lb", "nginx"):
            o = ops.get(t)
            if not o:
                continue
            lines.append(
                f"| {t} | {o['streams']} | {o['max_open']} | {o['outcomes']} | "
                f"{fmt(kib_mib(o.get('cold_idle_rss_kib')), 1)} / {fmt(kib_mib(o['idle_rss_kib']), 1)} | "
                f"{fmt(kib_mib(o['rss_at_all_open_kib']), 1)} | {fmt(kib_mib(o['peak_rss_kib']), 1)} | "
                f"**{fmt(o['kib_per_stream'], 2)}** | {fmt(kib_mib(o['rss_after_close_kib']), 1)} | "
                f"{fmt(kib_mib(o['rss_after_settle_kib']), 1)} ({o['settle_s']}) | {fmt(o['settle_over_idle'], 2)} |"
            )
        lines += [
            "",
            "KiB per open stream = (peak − idle RSS) / streams open at once; nginx: master + worker. "
            "Cold: RSS of the fresh process; idle: after a warm-up of "
            f"{next(iter(ops.values())).get('warm_streams')} streams cut the same way, 2 s later "
            "(the reference for the settled ratio).",
        ]
    f = res["footprint"]
    lines += [
        "",
        "## e. Footprint",
        "",
        f"- aoai-lb idle RSS (median of {f['starts']} cold starts): {fmt(kib_mib(f['idle_rss_kib']), 1)} MiB "
        f"(nginx master + worker at start: {fmt(kib_mib(f['nginx_idle_rss_kib']), 1)} MiB)",
        f"- Binary size: {fmt((f['binary_bytes'] or 0) / 1048576, 1)} MiB",
        f"- Start to ready (`/readyz` 200): {fmt(f['ready_ms'], 1)} ms",
        "",
    ]
    return "\n".join(lines)


def main():
    raw, out = sys.argv[1], sys.argv[2]
    res = summarize(load(raw))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    md = markdown(res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
