"""Validate the simulator against a real `pdserve bench run`, colocated and disaggregated.

Steps (about 8 minutes on 2 cores):
  1. `pdserve profile`: engine step times on this machine, now (the machine's speed drifts by tens
     of percent over an hour, so the profile is taken right before the runs it must predict);
  2. `pdserve calibrate`: serving overheads per mode, from a separate lightly loaded run
     (16 requests at 0.5 req/s, seed 1), written into the profile;
  3. per mode, a real cluster (`pdserve up`) and the real client (`pdserve bench run`) on the
     workload to predict (48 requests at 2 req/s, seed 0), and `pdserve sim` on the same request list
     with the profile: once with the calibrated overheads (the prediction) and once without.
The simulated workers are configured as `pdserve up` configures them; the KV link is fitted to the
loopback-TCP transfer bench (bench/results/transfer.json), never to these runs.

    .venv/bin/python bench/sim_validate.py                    # all steps
    .venv/bin/python bench/sim_validate.py --sim-only         # re-simulate the recorded real runs

Results: bench/results/sim_validation.json (machine, load averages, commands, the calibration,
every real request's record, every simulated request's times, summaries, errors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench.calibrate import calibrate  # noqa: E402
from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.bench.simcheck import CheckRun, fit_link, loadavg, real_run, register_link, sim_run  # noqa: E402

METRICS = (("median_ttft_ms", "median TTFT (ms)"), ("median_tpot_ms", "median TPOT (ms)"),
           ("output_throughput", "output throughput (tok/s)"), ("p90_ttft_ms", "p90 TTFT (ms)"),
           ("p90_tpot_ms", "p90 TPOT (ms)"), ("mean_e2el_ms", "mean E2EL (ms)"))
ACCEPT = ("median_ttft_ms", "median_tpot_ms", "output_throughput")  # the acceptance metrics, within 15%


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
    lines = [f"{'mode':<14} {'metric':<27} {'real':>9} {'sim':>9} {'error':>8}   {'sim, profile only':>17}"]
    for mode, m in modes.items():
        for key, label in METRICS:
            e, b = m["errors"][key], m["errors_without_serving_overheads"][key]
            flag = "" if key not in ACCEPT else ("  ok  " if abs(e["rel_error"]) <= 0.15 else "  >15%")
            lines.append(f"{mode:<14} {label:<27} {e['real']:>9.1f} {e['sim']:>9.1f} {e['rel_error']:>+8.1%}{flag:<6}"
                         f" {b['sim']:>9.1f} {b['rel_error']:>+7.1%}")
        rb = m["real"]["worker_busy_fraction"]
        sb = {k: v["busy_frac"] for k, v in m["sim"]["summary"]["instances"].items()}
        lines.append(f"{mode:<14} {'worker busy (real | sim)':<27} "
                     + ", ".join(f"{k.split('@')[0]} {v:.0%}" for k, v in sorted(rb.items())) + " | "
                     + ", ".join(f"{k} {v:.0%}" for k, v in sb.items()))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CheckRun()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--workload", default=d.workload)
    ap.add_argument("--length-scale", type=float, default=d.length_scale)
    ap.add_argument("--num-requests", type=int, default=d.num_requests)
    ap.add_argument("--rate", type=float, default=d.rate)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--workers", type=int, default=d.workers, help="workers per cluster (colocated: all colocated)")
    ap.add_argument("--prefill", type=int, default=d.prefill, help="prefill workers in the disaggregated cluster")
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--port", type=int, default=d.port)
    ap.add_argument("--modes", default="colocated,disaggregated")
    ap.add_argument("--profile", default=d.profile)
    ap.add_argument("--transfer", default="bench/results/transfer.json")
    ap.add_argument("--reprofile", action=argparse.BooleanOptionalAction, default=True,
                    help="run pdserve profile into --profile first")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="run pdserve calibrate on --profile first")
    ap.add_argument("--out", default="bench/results/sim_validation.json")
    ap.add_argument("--sim-only", action="store_true",
                    help="keep the real runs recorded in --out and the profile; re-run only the simulator")
    ap.add_argument("--note", action="append", help="a line recorded under notes in the JSON")
    args = ap.parse_args()
    os.chdir(REPO)

    link_fit = fit_link(Path(args.transfer), args.model)
    run = CheckRun(model=args.model, workload=args.workload, length_scale=args.length_scale,
                   num_requests=args.num_requests, rate=args.rate, seed=args.seed, workers=args.workers,
                   prefill=args.prefill, threads=args.threads, port=args.port, profile=args.profile,
                   link=register_link(link_fit))
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else None
    prior = old if args.sim_only else None
    t0 = time.monotonic()
    modes_run = args.modes.split(",")
    if not prior and args.reprofile:
        cmd = [sys.executable, "-m", "pdserve.cli", "profile", "--model", args.model, "--device", "cpu",
               "--threads", str(args.threads), "--repeats", "7", "--out", args.profile]
        print("== " + " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not prior and args.calibrate:
        print("== pdserve calibrate", flush=True)
        calibrate(args.profile, replace(run, num_requests=16, rate=0.5, seed=1, port=args.port + 10),
                  modes_run, args.transfer)
    modes: dict[str, Any] = {}
    for mode in modes_run:
        real = prior["modes"][mode]["real"] if prior else real_run(mode, run)
        sim = sim_run(mode, run)
        bare = sim_run(mode, run, serving_overheads=False)
        modes[mode] = {"real": real, "sim": sim, "errors": compare(real, sim),
                       "errors_without_serving_overheads": compare(real, bare),
                       "real_phase_medians_ms": real_phase_medians(real),
                       "diagnostics": diagnostics(real, args.profile)}
    profile = json.loads(Path(args.profile).read_text())
    payload = {**header(asdict(run)), "command": "python " + " ".join(sys.argv),
               "load_average_at_write": loadavg(), "wall_s": time.monotonic() - t0,
               "profile": {"path": args.profile, "command": profile.get("command"),
                           "load_average_1min": profile.get("load_average_1min"), "device": profile.get("device"),
                           "serving": profile.get("serving")},
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
                          "profile_load_average_1min": (old.get("profile") or {}).get("load_average_1min"),
                          "serving_overheads": (old.get("profile") or {}).get("serving")})
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
