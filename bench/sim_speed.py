"""Simulator speed: the whole Azure conversation trace on a 40-GPU cluster, fast path vs step-by-step.

The issue's target: 19,366 requests on 40 GPUs in under 10 s on one core. The cluster is Llama-3-70B,
2 prefill + 8 decode instances at TP4 on H100 (40 GPUs). Both ways of running the simulator go in
one process, one after the other, on the same request list:
  runs         decode steps the policy vouches for are applied in runs (the default);
  step-by-step one event and one schedule/update per step, as the engine steps.
The per-request results must be identical (checked here), so the ratio is the speed-up alone.
CPU seconds (process time) are the figure; wall time is recorded beside it (the 2 cores are shared).

    .venv/bin/python bench/sim_speed.py [--repeats 3] [--skip-step-by-step]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.config.model import resolve_shape  # noqa: E402
from pdserve.sim.build import GPU_SCALE, SimConfig, build_instances  # noqa: E402
from pdserve.sim.cluster import SimResult, Simulator  # noqa: E402
from pdserve.sim.hardware import get_link  # noqa: E402
from pdserve.sim.metrics import SLO, summarize  # noqa: E402
from pdserve.workload import generate  # noqa: E402

TRACE = REPO.parent / "shared" / "traces" / "azure2023_conv.csv"
TARGET_S = 10.0


def run(cfg: SimConfig, specs: list, runs: bool) -> tuple[SimResult, float, float]:  # type: ignore[type-arg]
    shape = resolve_shape(cfg.model)
    sim = Simulator(build_instances(cfg, shape), shape, get_link(cfg.link), cfg.layerwise, runs=runs)
    c0, w0 = time.process_time(), time.perf_counter()
    r = sim.run(specs)
    return r, time.process_time() - c0, time.perf_counter() - w0


def same(a: SimResult, b: SimResult) -> bool:
    eq = lambda x, y: all(p == q or (p != p and q != q) for p, q in zip(x, y, strict=True))  # noqa: E731
    return eq(a.first_token, b.first_token) and eq(a.finish, b.finish) and sorted(a.itls) == sorted(b.itls) \
        and a.instances == b.instances


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--repeats", type=int, default=3, help="runs of the fast path (the minimum is the figure)")
    ap.add_argument("--skip-step-by-step", action="store_true")
    ap.add_argument("--out", default="bench/results/sim_speed.json")
    args = ap.parse_args()
    os.chdir(REPO)
    cfg = SimConfig.of(model="llama-3-70b", mode="disagg", num_prefill=2, num_decode=8, tp_prefill=4,
                       tp_decode=4, link="cx7-400g", serving=GPU_SCALE)  # the settings its recorded results used
    specs = generate("chatbot", 0, 1.0, "trace", trace=args.trace)
    print(f"{len(specs)} requests, {cfg.label()} ({cfg.num_gpus} GPUs)", flush=True)
    fast = []
    for k in range(args.repeats):
        r, cpu, wall = run(cfg, specs, True)
        fast.append({"cpu_s": cpu, "wall_s": wall, "events": r.num_events})
        print(f"runs #{k + 1}: {cpu:.2f} s CPU ({wall:.2f} s wall), {r.num_events:,} events", flush=True)
    slow = None
    if not args.skip_step_by_step:
        print("step-by-step (about 4x longer) ...", flush=True)
        s, cpu, wall = run(cfg, specs, False)
        slow = {"cpu_s": cpu, "wall_s": wall, "events": s.num_events, "identical_results": same(r, s)}
        print(f"step-by-step: {cpu:.2f} s CPU ({wall:.2f} s wall), {s.num_events:,} events, "
              f"results identical: {slow['identical_results']}", flush=True)
    best = min(x["cpu_s"] for x in fast)
    summary = summarize(r, SLO(2000, 100))
    payload = {
        **header({"trace": args.trace, "cluster": cfg.label(), "gpus": cfg.num_gpus, "requests": len(specs)}),
        "command": "python bench/sim_speed.py " + " ".join(sys.argv[1:]),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "target_cpu_s": TARGET_S, "best_cpu_s": best, "target_met": best < TARGET_S,
        "runs": fast, "step_by_step": slow,
        "speedup_cpu": (slow["cpu_s"] / best) if slow else None,
        "sim_summary": {k: summary[k] for k in ("completed", "median_ttft_ms", "median_tpot_ms",
                                                 "output_throughput", "slo_attainment")},
    }
    write_json(args.out, payload)
    ratio = f", {payload['speedup_cpu']:.1f}x faster than step-by-step" if slow else ""
    print(f"best {best:.2f} s CPU against the {TARGET_S:.0f} s target{ratio}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
