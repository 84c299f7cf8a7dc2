"""A simulated day at GPU scale: the online SLA planner vs the best fixed split meeting the same attainment.

Llama-3-70B on H100s (TP4 instances, 16-64 GPUs), a day-shaped rate curve whose mix shifts: chat
(short prompts, long answers) at night and in the evening, long prompts with short answers in the
working hours (`pdserve.sim.elastic.shifting_day`). Replayed through the discrete-event simulator:
  planner: the SLA planner (sched/sla_planner.py) decides each next hour's split from what the
    simulated hour measured (elastic: it may add and remove instances up to the GPU limit, and turn
    disaggregation off and on);
  fixed:   for each size, the split the performance model finds best for the whole day; the smallest
    size whose day attainment reaches the planner's is the best fixed split, per mode.
Reported: GPU-hours, attainment overall and per hour, the roles over the day. JSON + PNG.

    python bench/elastic_sim.py                 # ~3-5 min on a loaded 2-core machine
    python bench/elastic_sim.py --hours 8 --window-s 10 --out /tmp/elastic_quick   # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.metrics_summary import SLO  # noqa: E402
from pdserve.sched.sla_planner import Load, PlannerSettings, SlaPlanner, Split  # noqa: E402
from pdserve.sim.build import GPU_SCALE  # noqa: E402
from pdserve.sim.capacity import roofline_capacity  # noqa: E402
from pdserve.sim.elastic import ElasticSim, Interval, Replay, shifting_day  # noqa: E402


def capacity(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    return roofline_capacity(args.model, args.gpu, args.tp, batch_tokens=GPU_SCALE["prefill"]["max_batch_tokens"],
                             max_seqs=GPU_SCALE["decode"]["max_batch_size"],
                             chunk_tokens=GPU_SCALE["colocated"]["max_num_batched_tokens"])


def planner(args: argparse.Namespace) -> SlaPlanner:
    return SlaPlanner(capacity(args), PlannerSettings(
        slo_ttft_s=args.slo_ttft_ms / 1e3, slo_tpot_s=args.slo_tpot_ms / 1e3, predictor=args.predictor,
        elastic=True, max_total=args.max_gpus // args.tp, cooldown_s=args.cooldown_s, hysteresis=args.hysteresis,
        min_workers={"colocated": 0}))


def needs(args: argparse.Namespace, day: list[Interval]) -> list[dict[str, float]]:
    """The model's need per hour at the true mean load (no corrections)."""
    p = planner(args)
    return [p.need(Load(iv.rate, iv.prompt.mean, iv.output.mean)) for iv in day]


def fixed_split(mode: str, n: int, need: list[dict[str, float]]) -> Split:
    """The n-instance split of `mode` with the least pressure on its worst hour."""
    if mode == "colocated":
        return Split(colocated=n)
    return min((Split(p, n - p) for p in range(1, n)),
               key=lambda s: max(SlaPlanner.pressure(s, x) for x in need))


def smallest_fixed(sim: ElasticSim, day: list[Interval], mode: str, need: list[dict[str, float]], target: float,
                   lo: int, hi: int, tried: list[dict[str, Any]], log: Any) -> Replay | None:
    """Binary search on the instance count for the smallest fixed split reaching `target`."""
    best: Replay | None = None
    while lo <= hi:
        n = (lo + hi) // 2
        s = fixed_split(mode, n, need)
        t = time.perf_counter()
        r = sim.replay(day, f"fixed {s}", fixed=s)
        tried.append({"split": s.as_dict(), "attainment": r.attainment, "gpu_hours": r.gpu_hours(sim.tp, sim.interval_s)})
        log(f"  fixed {s!s:>8}: attainment {r.attainment:.1%} ({time.perf_counter() - t:.0f} s)")
        if r.attainment >= target:
            best, hi = r, n - 1
        else:
            lo = n + 1
    return best


def plot(path: str, day: list[Interval], runs: list[Replay], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [iv.start_s / 3600 for iv in day]
    fig, ax = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax[0].step(hours, [iv.rate for iv in day], where="post", color="k")
    ax[0].set_ylabel("arrival rate (req/s)")
    for a in ax:
        for iv in day:
            if iv.phase == "long":
                a.axvspan(iv.start_s / 3600, iv.start_s / 3600 + 24 / len(day), color="orange", alpha=0.08)
    pl = runs[0]
    ax[1].stackplot(hours, [[r.split.prefill for r in pl.intervals], [r.split.decode for r in pl.intervals],
                            [r.split.colocated for r in pl.intervals]],
                    labels=["prefill", "decode", "colocated"], step="post", alpha=0.7)
    for r in runs[1:]:
        ax[1].step(hours, [x.split.total for x in r.intervals], where="post", ls="--", label=r.name)
    ax[1].set_ylabel("instances (TP4)")
    ax[1].legend(fontsize=8, loc="upper left")
    for r in runs:
        ax[2].step(hours, [x.attainment for x in r.intervals], where="post", label=f"{r.name} ({r.attainment:.1%})")
    ax[2].set_ylabel("SLO attainment")
    ax[2].set_xlabel("hour of the simulated day (orange: long-prompt phase)")
    ax[2].legend(fontsize=8, loc="lower left")
    ax[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--min-gpus", type=int, default=16, help="fixed splits searched from this size")
    ap.add_argument("--max-gpus", type=int, default=64)
    ap.add_argument("--hours", type=int, default=24, help="planner intervals in the day")
    ap.add_argument("--window-s", type=float, default=15.0, help="simulated traffic per interval")
    ap.add_argument("--switch-s", type=float, default=30.0, help="drain time of a role change")
    ap.add_argument("--peak-chat", type=float, default=60.0, help="req/s at the daily peak, chat mix")
    ap.add_argument("--peak-long", type=float, default=30.0, help="req/s at the daily peak, long-prompt mix")
    ap.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=40.0)
    ap.add_argument("--predictor", default="holt", choices=["constant", "holt"])
    ap.add_argument("--cooldown-s", type=float, default=3600.0)
    ap.add_argument("--hysteresis", type=float, default=0.15)
    ap.add_argument("--out", default=str(REPO / "bench/results/elastic_sim"))
    args = ap.parse_args()
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f} s] {msg}", flush=True)

    day = shifting_day(args.peak_chat, args.peak_long, hours=args.hours)
    interval_s = 24 * 3600 / args.hours
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)
    sim = ElasticSim(args.model, slo, gpu=args.gpu, tp=args.tp, interval_s=interval_s, window_s=args.window_s,
                     switch_s=args.switch_s)
    need = needs(args, day)
    first = need[0]
    start = Split(max(1, math.ceil(first["prefill"])), max(1, math.ceil(first["decode"])))
    log(f"planner replay ({args.hours} intervals, {args.window_s:g} s of traffic each)")
    pl = sim.replay(day, "planner", planner=planner(args), start=start, progress=lambda m: log("  " + m))
    target = pl.attainment
    log(f"planner: attainment {target:.1%}, {pl.gpu_hours(args.tp, interval_s):.0f} GPU-hours")
    lo, hi = max(1, args.min_gpus // args.tp), args.max_gpus // args.tp
    tried: list[dict[str, Any]] = []
    fixed: dict[str, Replay | None] = {}
    for mode in ("disagg", "colocated"):
        log(f"smallest fixed {mode} split reaching {target:.1%}")
        fixed[mode] = smallest_fixed(sim, day, mode, need, target, lo, hi, tried, log)
    found = [r for r in fixed.values() if r is not None]
    best = min(found, key=lambda r: r.gpu_hours(args.tp, interval_s)) if found else None
    gh = pl.gpu_hours(args.tp, interval_s)
    summary = {
        "planner_gpu_hours": gh, "planner_attainment": target,
        "planner_gpus_range": [min(r.split.total for r in pl.intervals) * args.tp,
                               max(r.split.total for r in pl.intervals) * args.tp],
        "planner_role_changes": sum(1 for r in pl.intervals if r.decision and r.decision["changed"]),
        "best_fixed": None if best is None else {"name": best.name, "gpu_hours": best.gpu_hours(args.tp, interval_s),
                                                 "attainment": best.attainment},
        "planner_over_best_fixed_gpu_hours": None if best is None else gh / best.gpu_hours(args.tp, interval_s),
        "fixed_found": {m: None if r is None else r.name for m, r in fixed.items()},
    }
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update({"interval_s": interval_s, "serving": GPU_SCALE})
    payload = {**header(config), "command": "python bench/elastic_sim.py " + " ".join(sys.argv[1:]),
               "load_average": os.getloadavg(), "wall_s": time.perf_counter() - t_all,
               "note": "simulation: the roofline model of the hardware catalog, not a measurement; each interval is "
                       "a window of its traffic starting from empty queues",
               "summary": summary, "fixed_tried": tried,
               "day": [{"start_h": iv.start_s / 3600, "rate": iv.rate, "phase": iv.phase,
                        "prompt_mean": iv.prompt.mean, "output_mean": iv.output.mean} for iv in day],
               "runs": [r.as_dict(args.tp, interval_s) for r in (pl, *found)]}
    write_json(args.out + ".json", payload)
    title = (f"{args.model} on {args.gpu} TP{args.tp}, SLO p90 TTFT {args.slo_ttft_ms:g} ms / TPOT "
             f"{args.slo_tpot_ms:g} ms; planner {gh:.0f} GPU-h"
             + ("" if best is None else f" vs best fixed {best.name} {best.gpu_hours(args.tp, interval_s):.0f} GPU-h"))
    plot(args.out + ".png", day, [pl, *found], title)
    log(f"wrote {args.out}.json/.png: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
