"""Validate the simulator against a real `pdserve bench run`, colocated and disaggregated.

For each mode a real cluster is started with `pdserve up` (colocated: N colocated workers;
disaggregated: P prefill + D decode), the real benchmark client `pdserve bench run` sends the seeded
workload to it, and `pdserve sim` (the same `sched/` policies on a modelled clock) is run on the SAME
request list (workload, seed, rate, length scale) with:
  - the step-time profile measured on this machine (`pdserve profile`, bench/results/profile_demo_cpu.json);
  - each instance configured as `pdserve up` configures its worker (block size, KV blocks from
    --kv-cache-memory-gb, token budgets, max_num_seqs, the prefill batcher's target and max wait);
  - a KV link fitted to the loopback-TCP transfer bench (bench/results/transfer.json: time = latency +
    bytes / bandwidth, least squares over the demo model's tcp cases), never to this validation.
The table gives median TTFT, median TPOT and output throughput, real vs sim, with relative errors
(sim / real - 1), plus each worker's busy fraction (real: the router's /metrics; sim: modelled).

    .venv/bin/python bench/sim_validate.py                    # both modes, ~3 minutes
    .venv/bin/python bench/sim_validate.py --sim-only         # re-simulate the recorded real runs

Results: bench/results/sim_validation.json (machine, load averages, commands, every real request's
record, every simulated request's times, summaries, errors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench.cluster import busy_during, running_cluster, scrape_busy, up_args  # noqa: E402
from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.config.cluster import ClusterConfig as UpConfig  # noqa: E402
from pdserve.config.model import resolve_shape  # noqa: E402
from pdserve.sim import hardware  # noqa: E402
from pdserve.sim.build import ClusterConfig, build  # noqa: E402
from pdserve.sim.metrics import per_request_ms, summarize  # noqa: E402
from pdserve.workload import generate  # noqa: E402

METRICS = (("median_ttft_ms", "median TTFT (ms)"), ("median_tpot_ms", "median TPOT (ms)"),
           ("output_throughput", "output throughput (tok/s)"), ("p90_ttft_ms", "p90 TTFT (ms)"),
           ("p90_tpot_ms", "p90 TPOT (ms)"), ("mean_e2el_ms", "mean E2EL (ms)"))
ACCEPT = ("median_ttft_ms", "median_tpot_ms", "output_throughput")  # the acceptance metrics, within 15%


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
    name = "loopback-tcp-measured"
    hardware.LINKS[name] = hardware.Link("loopback TCP (pdserve transfer bench)", fit["bandwidth_Bps"],
                                         fit["latency_s"], 1.0, "tcp")
    return name


def sim_config(mode: str, args: argparse.Namespace, link: str) -> ClusterConfig:
    """The simulated cluster, configured as `pdserve up` configures its workers (defaults of config/cluster.py)."""
    up = UpConfig()
    shape = resolve_shape(args.model)
    num_blocks = max(4, int(up.kv_cache_memory_gb * 2**30 // (up.block_size * shape.kv_bytes_per_token())))
    common = dict(model=args.model, link=link, block_size=up.block_size, num_blocks=num_blocks,
                  profile=args.profile, prefill_gpu="h100", decode_gpu="h100")
    if mode == "colocated":
        return ClusterConfig(mode="colocated", num_colocated=args.workers,
                             chunk_tokens=up.colocated.max_num_batched_tokens,
                             max_num_seqs=up.colocated.max_num_seqs, **common)
    p = args.prefill
    assert up.decode.max_num_seqs == 2 * up.decode.max_batch_size, "sim's decode max_num_seqs is 2 x batch"
    assert up.prefill.max_num_seqs == up.decode.max_batch_size, "sim uses one max_num_seqs for both roles"
    return ClusterConfig(mode="disagg", num_prefill=p, num_decode=args.workers - p,
                         chunk_tokens=up.decode.max_num_batched_tokens, max_num_seqs=up.decode.max_batch_size,
                         prefill_batch_tokens=up.prefill.max_batch_tokens,
                         prefill_max_wait_ms=up.prefill.max_wait_ms, **common)


def workload_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--workload", args.workload, "--num-requests", str(args.num_requests),
            "--seed", str(args.seed), "--length-scale", str(args.length_scale), "--arrival", "poisson"]


def real_run(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start the mode's cluster, run `pdserve bench run` against it, stop it."""
    p, d, c = (0, 0, args.workers) if mode == "colocated" else (args.prefill, args.workers - args.prefill, 0)
    up = up_args(args.model, p, d, c, args.threads, args.port)
    out = Path(tempfile.mkdtemp(prefix="pdserve-simval-")) / f"{mode}.json"
    bench = ["bench", "run", "--url", f"http://127.0.0.1:{args.port}", "--rate", str(args.rate),
             *workload_flags(args), "--no-progress", "--out", str(out)]
    print(f"== {mode}: pdserve {' '.join(up)}", flush=True)
    load_before = loadavg()
    with running_cluster(up, args.port, mode, 180.0) as cl:
        time.sleep(args.settle)
        if args.warmup:  # one throwaway request per worker: first-call costs stay out of the run
            subprocess.run([sys.executable, "-m", "pdserve.cli", "bench", "run", "--url", cl.url, "--rate", "inf",
                            "--model", args.model, "--workload", args.workload, "--num-requests", str(2 * args.workers),
                            "--seed", "999", "--length-scale", str(args.length_scale), "--no-progress"],
                           check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        load_start = loadavg()
        before = scrape_busy(cl.url)
        print(f"   pdserve {' '.join(bench)}", flush=True)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "pdserve.cli", *bench], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.monotonic() - t0
        busy = busy_during(before, scrape_busy(cl.url), cl.ready_at)
        load_end = loadavg()
    rec = json.loads(out.read_text())
    return {"up_command": "pdserve " + " ".join(up), "bench_command": "pdserve " + " ".join(bench),
            "workers": {"prefill": p, "decode": d, "colocated": c}, "wall_s": wall,
            "load_average": {"before_cluster": load_before, "run_start": load_start, "run_end": load_end},
            "worker_busy_fraction": busy, "summary": rec["summary"], "requests": rec["requests"]}


def sim_run(mode: str, args: argparse.Namespace, link: str, decode_grid: bool = True) -> dict[str, Any]:
    """decode_grid=False: decode steps from the fitted plane only (the model before the grid existed)."""
    import dataclasses

    from pdserve.sim import profile as prof

    cfg = sim_config(mode, args, link)
    specs = generate(args.workload, args.num_requests, args.rate, arrival="poisson", seed=args.seed,
                     length_scale=args.length_scale)
    load = prof.ProfiledModel.load
    if not decode_grid:
        prof.ProfiledModel.load = classmethod(  # type: ignore[method-assign]
            lambda cls, path: dataclasses.replace(load(path), decode_grid=None))
    try:
        r = build(cfg).run(specs)
    finally:
        prof.ProfiledModel.load = load  # type: ignore[method-assign]
    res = summarize(r)
    m = per_request_ms(r)
    from dataclasses import asdict

    return {"cluster": asdict(cfg), "label": cfg.label(), "summary": res,
            "requests": {k: [None if np.isnan(v) else float(v) for v in m[k]] for k in ("ttft", "tpot", "e2el")}}


def real_phase_medians(real: dict[str, Any]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in real["requests"]:
        for k, v in (r.get("timings") or {}).items():
            acc.setdefault(k, []).append(v * 1e3)
    return {k: float(np.median(v)) for k, v in acc.items()}


def diagnostics(real: dict[str, Any], profile: str) -> dict[str, Any]:
    """Where real and modelled time part: what the real requests spent outside the phases the sim
    models (HTTP, router, RPC, relaying the first token), and the real prefill phase vs the profile fit."""
    from pdserve.sim.profile import ProfiledModel

    fit = ProfiledModel.load(profile)
    recs = [r for r in real["requests"] if r.get("success")]
    pre = ("router_queue", "prefill_queue", "queue", "prefill")
    gap = [r["ttft_s"] * 1e3 - sum(v * 1e3 for k, v in r["timings"].items() if k in pre) for r in recs]
    ratio = [r["timings"]["prefill"] / fit.prefill_time([r["prompt_tokens"]]) for r in recs if "prefill" in r["timings"]]
    itl = [g * 1e3 for r in recs for g in r["itl_s"]]
    return {"ttft_outside_server_phases_ms": {"median": float(np.median(gap)), "p90": float(np.percentile(gap, 90))},
            "real_prefill_phase_over_fit_single_prompt": {"median": float(np.median(ratio)),
                                                          "p90": float(np.percentile(ratio, 90))},
            "real_itl_median_ms": float(np.median(itl)),
            "fit_decode_step_ms_batch1_ctx150": fit.decode_time([150]) * 1e3}


def compare(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, _ in METRICS:
        a, b = float(real["summary"][key]), float(sim["summary"][key])
        out[key] = {"real": a, "sim": b, "rel_error": (b / a - 1.0) if a else None}
    return out


def format_table(modes: dict[str, Any]) -> str:
    lines = [f"{'mode':<14} {'metric':<27} {'real':>9} {'sim':>9} {'error':>8}"]
    for mode, m in modes.items():
        for key, label in METRICS:
            e = m["errors"][key]
            flag = "" if key not in ACCEPT else ("  ok" if abs(e["rel_error"]) <= 0.15 else "  >15%")
            lines.append(f"{mode:<14} {label:<27} {e['real']:>9.1f} {e['sim']:>9.1f} {e['rel_error']:>+8.1%}{flag}")
        rb = m["real"]["worker_busy_fraction"]
        sb = {k: v["busy_frac"] for k, v in m["sim"]["summary"]["instances"].items()}
        lines.append(f"{mode:<14} {'worker busy (real | sim)':<27} "
                     + ", ".join(f"{k.split('@')[0]} {v:.0%}" for k, v in sorted(rb.items())) + " | "
                     + ", ".join(f"{k} {v:.0%}" for k, v in sb.items()))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--workload", default="chatbot-small")
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="workers per cluster (colocated: all colocated)")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers in the disaggregated cluster")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=8650)
    ap.add_argument("--modes", default="colocated,disaggregated")
    ap.add_argument("--profile", default="bench/results/profile_demo_cpu.json")
    ap.add_argument("--transfer", default="bench/results/transfer.json")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between /health and the run")
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="send one throwaway request per worker before the measured run")
    ap.add_argument("--out", default="bench/results/sim_validation.json")
    ap.add_argument("--sim-only", action="store_true",
                    help="keep the real runs recorded in --out; re-run only the simulator")
    ap.add_argument("--note", action="append", help="a line recorded under notes in the JSON")
    args = ap.parse_args()
    os.chdir(REPO)

    link_fit = fit_link(Path(args.transfer), args.model)
    link = register_link(link_fit)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else None
    prior = old if args.sim_only else None
    t0 = time.monotonic()
    modes: dict[str, Any] = {}
    for mode in args.modes.split(","):
        real = prior["modes"][mode]["real"] if prior else real_run(mode, args)
        sim = sim_run(mode, args, link)
        plane = sim_run(mode, args, link, decode_grid=False)
        modes[mode] = {"real": real, "sim": sim, "errors": compare(real, sim),
                       "errors_decode_plane_fit_only": compare(real, plane),
                       "real_phase_medians_ms": real_phase_medians(real),
                       "diagnostics": diagnostics(real, args.profile)}
    config = {k: getattr(args, k) for k in ("model", "workload", "length_scale", "num_requests", "rate", "seed",
                                            "workers", "prefill", "threads", "profile", "warmup")}
    profile = json.loads(Path(args.profile).read_text())
    payload = {**header(config), "command": "python " + " ".join(sys.argv),
               "load_average_at_write": loadavg(), "wall_s": time.monotonic() - t0,
               "profile": {"path": args.profile, "date_measured_command": profile.get("command"),
                           "load_average_1min": profile.get("load_average_1min"), "device": profile.get("device")},
               "link": link_fit, "modes": modes}
    if prior:
        payload["real_runs_from"] = prior.get("real_runs_from") or {"date": prior.get("date"),
                                                                    "command": prior.get("command")}
    # Earlier validations (their tables and errors): the machine is noisy, so keep the spread visible.
    history = list((old or {}).get("previous_runs", []))
    if old and not args.sim_only:
        history.append({k: old.get(k) for k in ("date", "command", "load_average_at_write", "table")}
                       | {"errors": {m: v["errors"] for m, v in old["modes"].items()},
                          "load_average": {m: v["real"]["load_average"] for m, v in old["modes"].items()},
                          "profile_load_average_1min": (old.get("profile") or {}).get("load_average_1min")})
    payload["previous_runs"] = history
    if args.note:
        payload["notes"] = args.note
    table = format_table(modes)
    payload["table"] = table
    write_json(args.out, payload)
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
