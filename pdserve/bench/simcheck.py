"""A real `pdserve up` + `pdserve bench run`, and the simulator on the same requests, side by side.

Shared by `pdserve calibrate` (which measures the serving overheads a step profile misses on a
lightly loaded run) and `bench/sim_validate.py` (which checks the simulator's prediction of a
loaded run). The simulated cluster is configured as `pdserve up` configures its workers, and the
KV link is the loopback-TCP line fitted to the transfer bench, never to these runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.cluster import busy_during, running_cluster, scrape_busy, up_args
from pdserve.config.load import cluster_from_dict
from pdserve.config.model import resolve_shape
from pdserve.config.schema import CPU_KV_CACHE_GB
from pdserve.sim import hardware
from pdserve.sim.build import SimConfig, build
from pdserve.sim.metrics import per_request_ms, summarize
from pdserve.workload import generate

MODES = {"colocated": "colocated", "disaggregated": "disagg"}  # run name -> sim mode


@dataclass
class CheckRun:
    """One workload sent to one cluster shape (both modes use the same number of workers)."""

    model: str = "demo"
    workload: str = "chatbot-small"
    length_scale: float = 0.25
    num_requests: int = 48
    rate: float = 2.0
    seed: int = 0
    workers: int = 2  # per cluster; colocated: all colocated
    prefill: int = 1  # prefill workers of the disaggregated cluster
    threads: int = 1
    port: int = 8650
    settle_s: float = 2.0  # between /health and the run
    warmup: bool = True  # one throwaway request per worker first
    profile: str = "bench/results/profile_demo_cpu.json"
    link: str = "cx7-400g"  # a catalog link name (see register_link)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def fit_link(transfer_json: Path, model: str) -> dict[str, Any]:
    """latency + bytes / bandwidth, least squares over the transfer bench's tcp cases of `model`."""
    d = json.loads(transfer_json.read_text())
    cases = [c for c in d["cases"] if c["transport"] == "tcp" and c["model"] == model]
    if len(cases) < 2:
        cases = [c for c in d["cases"] if c["transport"] == "tcp"]
    x = np.array([c["bytes"] for c in cases], dtype=float)
    y = np.array([float(np.median(c["seconds"])) for c in cases])
    slope, intercept = np.polyfit(x, y, 1)
    return {"source": str(transfer_json), "cases": [[int(b), float(t)] for b, t in zip(x, y, strict=True)],
            "bandwidth_Bps": float(1.0 / slope), "latency_s": max(0.0, float(intercept)),
            "reference_loopback_tcp_gbps": d.get("reference_gbps", {}).get("loopback_tcp")}


def register_link(fit: dict[str, Any]) -> str:
    """Add the fitted loopback link to the catalog (this process only); returns its name."""
    name = "loopback-tcp-measured"
    hardware.LINKS[name] = hardware.Link("loopback TCP (pdserve transfer bench)", fit["bandwidth_Bps"],
                                         fit["latency_s"], 1.0, "tcp")
    return name


def sim_config(mode: str, run: CheckRun, serving_overheads: bool = True) -> SimConfig:
    """The simulated cluster: the one `pdserve up` starts for this run (the schema's settings, the
    run's worker counts), with the KV blocks its workers get from `cache.kv_cache_memory_gb`."""
    p, d, c = (0, 0, run.workers) if mode == "colocated" else (run.prefill, run.workers - run.prefill, 0)
    up = cluster_from_dict({"model": run.model})
    shape = resolve_shape(run.model)
    num_blocks = max(4, int((up.cache.kv_cache_memory_gb or CPU_KV_CACHE_GB) * 2**30 // (up.cache.block_size * shape.kv_bytes_per_token())))
    return SimConfig.of(model=run.model, num_prefill=p, num_decode=d, num_colocated=c,
                        serving={"cache": {"num_blocks": num_blocks}}, link=run.link, profile=run.profile,
                        prefill_gpu="h100", decode_gpu="h100", serving_overheads=serving_overheads)


def workload_flags(run: CheckRun) -> list[str]:
    return ["--model", run.model, "--workload", run.workload, "--num-requests", str(run.num_requests),
            "--seed", str(run.seed), "--length-scale", str(run.length_scale), "--arrival", "poisson"]


def real_run(mode: str, run: CheckRun) -> dict[str, Any]:
    """Start the mode's cluster, run `pdserve bench run` against it, stop it."""
    p, d, c = (0, 0, run.workers) if mode == "colocated" else (run.prefill, run.workers - run.prefill, 0)
    up = up_args(run.model, p, d, c, run.threads, run.port)
    out = Path(tempfile.mkdtemp(prefix="pdserve-simcheck-")) / f"{mode}.json"
    bench = ["bench", "run", "--url", f"http://127.0.0.1:{run.port}", "--rate", str(run.rate),
             *workload_flags(run), "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"== {mode}: pdserve {' '.join(up)}", flush=True)
    load_before = loadavg()
    with running_cluster(up, run.port, mode, 180.0) as cl:
        time.sleep(run.settle_s)
        if run.warmup:  # throwaway requests: first-call costs stay out of the run
            subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "run", "--url", cl.url, "--rate", "inf",
                            "--model", run.model, "--workload", run.workload, "--num-requests", str(2 * run.workers),
                            "--seed", "999", "--length-scale", str(run.length_scale), "--no-progress"],
                           check=True, capture_output=True, env=env)
        load_start = loadavg()
        before = scrape_busy(cl.url)
        print(f"   pdserve {' '.join(bench)}", flush=True)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "pdserve.cli", *bench], check=True, env=env)
        wall = time.monotonic() - t0
        busy = busy_during(before, scrape_busy(cl.url), cl.ready_at)
        load_end = loadavg()
    rec = json.loads(out.read_text())
    return {"up_command": "pdserve " + " ".join(up), "bench_command": "pdserve " + " ".join(bench),
            "workers": {"prefill": p, "decode": d, "colocated": c}, "wall_s": wall,
            "load_average": {"before_cluster": load_before, "run_start": load_start, "run_end": load_end},
            "worker_busy_fraction": busy, "summary": rec["summary"], "requests": rec["requests"]}


def sim_run(mode: str, run: CheckRun, serving_overheads: bool = True, **overrides: Any) -> dict[str, Any]:
    """The simulator on the run's request list. overrides: SimConfig fields (e.g. profile)."""
    cfg = replace(sim_config(mode, run, serving_overheads), **overrides)
    specs = generate(run.workload, run.num_requests, run.rate, arrival="poisson", seed=run.seed,
                     length_scale=run.length_scale)
    r = build(cfg).run(specs)
    m = per_request_ms(r)
    return {"cluster": cfg.as_dict(), "label": cfg.label(), "summary": summarize(r),
            "requests": {k: [None if np.isnan(v) else float(v) for v in m[k]] for k in ("ttft", "tpot", "e2el")}}
