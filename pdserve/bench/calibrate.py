"""`pdserve calibrate`: measure the serving overheads a step profile cannot see; add them to it.

`pdserve profile` times engine steps alone. A served step also hands its tokens from the engine
thread to the event loop and sends a message per token; a served request also crosses HTTP, the
router and worker RPC (and, disaggregated, the KV push bookkeeping). Per cluster mode this runs a
lightly loaded real benchmark (default 16 requests at 0.5 req/s, seed 1: requests mostly alone),
simulates the same requests with the profile alone, and takes the differences of the medians:
    step_overhead_s    = real median TPOT - simulated median TPOT
    request_overhead_s = real median TTFT - simulated median TTFT (with the step overhead in)
both floored at 0, and writes them under "serving" in the profile (`pdserve sim --profile` then
uses them; SimConfig.serving_overheads=False leaves them out). Before the two differences it
reads the host-sharing factors off the same run's request records (`prefill_factor`,
`corun_prefill_factor`, `corun_decode_factor`: `pdserve/bench/prefill_factors.py`, the engine's
timing of each prompt's step and the decode-only steps' token gaps) and simulates with them in,
so the overheads are what is left beyond them; the factors go into the profile beside the
overheads, with their sample counts under "measured". A co-running factor needs steps that
co-ran (MIN_SAMPLES of them): on a one-worker cluster or a run with requests all alone it is
left at its fallback (the alone factor; 1.0 for decode), and a busier `--rate` measures it.
Calibrate on a run like this, then validate on a different, loaded one (bench/sim_validate.py
does both).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdserve.bench.prefill_factors import FACTOR_KEYS, factors_of_run
from pdserve.bench.simcheck import MODES, CheckRun, fit_link, loadavg, real_run, register_link, sim_run


def _with_serving(profile: dict[str, Any], mode: str, step_s: float, request_s: float,
                  factors: dict[str, float]) -> str:
    """A temporary copy of the profile with these overheads and factors for `mode`; returns its path."""
    p = json.loads(json.dumps(profile))
    p.setdefault("serving", {})[mode] = {"step_overhead_s": step_s, "request_overhead_s": request_s, **factors}
    f = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pdserve-calib-", delete=False)
    with f:
        json.dump(p, f)
    return f.name


def calibrate_mode(name: str, run: CheckRun, profile: dict[str, Any]) -> dict[str, Any]:
    """One mode: the real lightly loaded run, then the two differences (module doc)."""
    mode = MODES[name]
    rec = real_run(name, run)
    real = rec["summary"]
    found = factors_of_run(rec["requests"], profile, run.model, name)
    factors = {k: found[k] for k in FACTOR_KEYS}
    bare = sim_run(name, run, serving_overheads=False)["summary"]

    def sim_with(step_s: float) -> dict[str, Any]:
        path = _with_serving(profile, mode, step_s, 0.0, factors)
        try:
            return sim_run(name, run, profile=path)["summary"]
        finally:
            os.unlink(path)

    with_factors = sim_with(0.0)
    step = max(0.0, (real["median_tpot_ms"] - with_factors["median_tpot_ms"]) / 1e3)
    with_step = sim_with(step)
    request = max(0.0, (real["median_ttft_ms"] - with_step["median_ttft_ms"]) / 1e3)
    keys = ("median_ttft_ms", "median_tpot_ms", "output_throughput")
    return {"step_overhead_s": step, "request_overhead_s": request, **factors,
            "measured": {"real": {k: real[k] for k in keys}, "sim_profile_only": {k: bare[k] for k in keys},
                         "sim_with_factors": {k: with_factors[k] for k in keys},
                         "sim_with_step_overhead": {k: with_step[k] for k in keys},
                         "factor_samples": {k: v for k, v in found.items() if k not in FACTOR_KEYS},
                         "load_average_at_end": loadavg()}}


def calibrate(profile_path: str, run: CheckRun, modes: list[str], transfer: str) -> dict[str, Any]:
    """Calibrate `modes` and write the results into the profile file; returns its serving section."""
    run = replace(run, profile=profile_path, link=register_link(fit_link(Path(transfer), run.model)))
    profile = json.loads(Path(profile_path).read_text())
    serving = dict(profile.get("serving") or {})
    for name in modes:
        serving[MODES[name]] = calibrate_mode(name, run, profile)
        s = serving[MODES[name]]
        print(f"{name}: step overhead {s['step_overhead_s'] * 1e3:.2f} ms, "
              f"request overhead {s['request_overhead_s'] * 1e3:.2f} ms, prefill factor {s['prefill_factor']:.2f} "
              f"(co-running {s['corun_prefill_factor']:.2f}), co-running decode factor "
              f"{s['corun_decode_factor']:.2f}", flush=True)
    serving["calibration"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "pdserve calibrate " + " ".join(sys.argv[sys.argv.index("calibrate") + 1 :]
                                                   if "calibrate" in sys.argv else []),
        "run": {k: v for k, v in vars(run).items() if k not in ("profile", "link")},
        "link_fit_from": transfer,
    }
    profile["serving"] = serving
    Path(profile_path).write_text(json.dumps(profile, indent=1))
    return serving


def main(args: argparse.Namespace) -> int:
    """The `pdserve calibrate` handler (flags: pdserve/bench/commands.py)."""
    run = CheckRun(model=args.model, workload=args.workload, length_scale=args.length_scale,
                   num_requests=args.num_requests, rate=args.rate, seed=args.seed, workers=args.workers,
                   prefill=args.prefill, threads=args.threads, port=args.port)
    calibrate(args.profile, run, args.modes.split(","), args.transfer)
    print(f"wrote the serving overheads and host-sharing factors into {args.profile}")
    return 0
