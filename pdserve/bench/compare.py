"""`pdserve bench compare`: colocated vs disaggregated on this machine, same workers, same requests.

For each mode a `pdserve up` cluster of N workers is started (colocated: N colocated workers behind
the router; disaggregated: P prefill + D decode, P + D = N), the same seeded requests and prompts
are sent at each rate of the sweep, each worker's busy fraction is read from the router's /metrics,
and the cluster is stopped. The modes run one after the other on the same cores, so the machine's
noise lands on both; the table reports disaggregated / colocated ratios.
"""

from __future__ import annotations

import argparse
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


def run_mode(mode: str, args: argparse.Namespace, preps: list[Prepared]) -> dict[str, Any]:
    """Start the mode's cluster, run every rate, stop it; the runs with their records and busy fractions."""
    p, d, c = mode_workers(mode, args.workers, args.prefill)
    cmd = up_args(args.model, p, d, c, args.threads, args.port)
    label = f"{mode} ({p}P+{d}D)" if mode != "colocated" else f"colocated ({c} workers)"
    print(f"== {label}: pdserve {' '.join(cmd)}", flush=True)
    t = time.monotonic()
    runs = []
    with running_cluster(cmd, args.port, label, args.startup_timeout) as cl:
        startup = time.monotonic() - t
        for prep in preps:
            before = scrape_busy(cl.url)
            res, run = run_once(cl.url, args, prep)
            busy = busy_during(before, scrape_busy(cl.url), cl.ready_at)
            res["worker_busy_fraction"] = busy
            print(f"   rate {prep.rate:g}: {res['completed']}/{res['num_prompts']} ok, "
                  f"goodput {res.get('request_goodput', 0):.2f} req/s, p99 TTFT {res['p99_ttft_ms']:.0f} ms, "
                  f"p99 TPOT {res['p99_tpot_ms']:.0f} ms, busy "
                  + ", ".join(f"{w.split('@')[0]} {b:.0%}" for w, b in busy.items()), flush=True)
            runs.append({"rate": prep.rate, "summary": res, "requests": [r.as_dict() for r in run.records]})
    return {"label": label, "workers": {"prefill": p, "decode": d, "colocated": c}, "command": "pdserve " + " ".join(cmd),
            "startup_s": startup, "runs": runs}


def run_compare(args: argparse.Namespace) -> int:
    from pdserve.bench.plots import plot_all

    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    ids = vocab_ids(args.tokenizer or args.model)
    preps = [prepare(args, r, ids) for r in rates]
    t0 = time.monotonic()
    modes = {m: run_mode(m, args, preps) for m in MODES}
    config = {**workload_config(args), "rates": rates, "workers": args.workers, "prefill": args.prefill,
              "threads": args.threads}
    payload = {**header(config), "wall_s": time.monotonic() - t0, "modes": modes}
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
