"""`pdserve bench compare`: colocated vs disaggregated on this machine, same workers, same requests.

For each rate of the sweep and each mode a fresh `pdserve up` cluster of N workers is started
(colocated: N colocated workers behind the router; disaggregated: P prefill + D decode, P + D = N),
the rate's requests are sent, each worker's busy fraction is read from the router's /metrics, and
the cluster is stopped. The modes alternate rate by rate on the same cores, so the machine's noise
lands on both. Every rate gets its own prompts (same lengths, different tokens), the same set for
both modes, and every run starts with empty prefix caches: no run is served from what an earlier
one left behind, unless the workload itself shares prefixes (a trace with hash_ids). Each run
reports the prefix-cache hit rate it saw; the table reports disaggregated / colocated ratios.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from pdserve.bench.cluster import busy_during, running_cluster, scrape_busy, up_args
from pdserve.bench.prompts import vocab_ids
from pdserve.bench.report import header, write_json
from pdserve.bench.run import Prepared, prepare, run_once, workload_config
from pdserve.bench.table import format_table

MODES = ("colocated", "disaggregated")


def mode_workers(mode: str, n: int, prefill: int | None) -> tuple[int, int, int]:
    """(prefill, decode, colocated) worker counts for a mode with N workers in all."""
    if mode == "colocated":
        return 0, 0, n
    p = prefill if prefill is not None else max(1, n // 2)
    if not 1 <= p < n:
        raise ValueError(f"disaggregated needs 1 <= prefill < workers, got prefill={p} workers={n}")
    return p, n - p, 0


def run_one(mode: str, args: argparse.Namespace, prep: Prepared) -> dict[str, Any]:
    """A fresh cluster for one mode and one rate: start it, run the rate, stop it."""
    p, d, c = mode_workers(mode, args.workers, args.prefill)
    cmd = up_args(args.model, p, d, c, args.threads, args.port)
    label = mode_label(mode, p, d, c)
    print(f"== {label} @ {prep.rate:g} req/s: pdserve {' '.join(cmd)}", flush=True)
    t = time.monotonic()
    with running_cluster(cmd, args.port, label, args.startup_timeout) as cl:
        startup = time.monotonic() - t
        before = scrape_busy(cl.url)
        res, run = run_once(cl.url, args, prep)
        busy = busy_during(before, scrape_busy(cl.url), cl.ready_at)
    res["worker_busy_fraction"] = busy
    res["load_average"] = list(os.getloadavg())
    print(f"   {res['completed']}/{res['num_prompts']} ok, goodput {res.get('request_goodput', 0):.2f} req/s, "
          f"p99 TTFT {res['p99_ttft_ms']:.0f} ms, p99 TPOT {res['p99_tpot_ms']:.0f} ms, "
          f"p99 worst gap {res.get('p99_max_itl_ms', 0):.0f} ms, prefix hits {res['prefix_cache_hit_rate']:.0%}, "
          "busy " + ", ".join(f"{w.split('@')[0]} {b:.0%}" for w, b in busy.items())
          + f", load {res['load_average'][0]:.1f}", flush=True)
    return {"rate": prep.rate, "startup_s": startup, "summary": res,
            "requests": [r.as_dict() for r in run.records]}


def mode_label(mode: str, p: int, d: int, c: int) -> str:
    return f"{mode} ({p}P+{d}D)" if mode != "colocated" else f"colocated ({c} workers)"


def run_compare(args: argparse.Namespace) -> int:
    from pdserve.bench.plots import plot_all

    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    ids = vocab_ids(args.tokenizer or args.model)
    preps = [prepare(args, r, ids, fresh=i) for i, r in enumerate(rates)]
    t0 = time.monotonic()
    modes: dict[str, dict[str, Any]] = {}
    for m in MODES:
        p, d, c = mode_workers(m, args.workers, args.prefill)
        modes[m] = {"label": mode_label(m, p, d, c), "workers": {"prefill": p, "decode": d, "colocated": c},
                    "command": "pdserve " + " ".join(up_args(args.model, p, d, c, args.threads, args.port)),
                    "runs": []}
    for i, prep in enumerate(preps):  # alternate which mode goes first, so neither always runs later
        for m in (MODES if i % 2 == 0 else MODES[::-1]):
            modes[m]["runs"].append(run_one(m, args, prep))
    config = {**workload_config(args), "rates": rates, "workers": args.workers, "prefill": args.prefill,
              "threads": args.threads}
    payload = {**header(config), "wall_s": time.monotonic() - t0, "modes": modes,
               "load_average_end": list(os.getloadavg())}
    table = format_table(payload)
    payload["table"] = table
    out = Path(args.out_dir)
    stem = args.name or f"compare_{args.workload}"
    write_json(out / f"{stem}.json", payload)
    pngs = plot_all(payload, out, stem)
    print(table)
    print(f"wrote {out / (stem + '.json')} and {', '.join(str(p) for p in pngs)} "
          f"({payload['wall_s']:.0f} s in all)")
    return 0


def rescore(args: argparse.Namespace) -> int:
    """Recompute a compare run's summaries, table and plots under other SLOs, from its raw records."""
    import json

    from pdserve.bench.client import RequestRecord, RunResult
    from pdserve.bench.plots import plot_all
    from pdserve.bench.report import summarize_run
    from pdserve.metrics_summary import SLO

    src = Path(args.json)
    payload = json.loads(src.read_text())
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, itl_ms=args.slo_itl_ms)
    for m in payload["modes"].values():
        for run in m["runs"]:
            recs = [RequestRecord(**{k: (float("nan") if v is None and k in ("ttft_s", "e2el_s") else v)
                                     for k, v in r.items()}) for r in run["requests"]]
            old = run["summary"]
            new = summarize_run(RunResult(recs, old["duration"]), slo)
            for k in ("worker_busy_fraction", "load_average", "request_rate"):
                if k in old:
                    new[k] = old[k]
            run["summary"] = new
    payload["config"].update(slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, slo_itl_ms=args.slo_itl_ms)
    payload["rescored_from"] = {"file": src.name, "command": payload.get("command")}
    payload["table"] = format_table(payload)
    out = Path(args.out_dir)
    write_json(out / f"{args.name}.json", payload)
    plot_all(payload, out, args.name)
    print(payload["table"])
    return 0
