"""`pdserve plan --map`: where disaggregation pays, as a map over prompt and output lengths.

At each (prompt, output) point of the grid, for each mode, the best configuration's goodput per
GPU (and per dollar): goodput is the highest request rate at which `target` of the requests meet
every SLO (DistServe's definition), found by a rate search on the simulator.

Candidates per point, the planner's way (sim/planner.py): its analytical per-instance capacities
rank the TP degrees per GPU. Disaggregated: each role's best TP, at the `RATIOS` P:D ratios nearest
the analytical balance (prefill capacity against decode capacity) with at most MAX_SIDE a side.
Colocated: the `TOP_TP` best TPs, each on as many GPUs as the disaggregated candidates use.
Each candidate's goodput is bisected in rate from its analytical capacity. The map is the ratio
disaggregated / colocated; the search's resolution (~10%) and the capped simulation length make
ratios within about 0.8-1.25x a tie.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from pdserve.config.model import resolve_shape
from pdserve.sim.build import SimConfig, build
from pdserve.sim.metrics import SLO, attainment
from pdserve.sim.planner import _base, _tps, decode_capacity, prefill_capacity
from pdserve.workload import RequestSpec, arrival_times

TOP_TP = 2  # colocated TP degrees simulated: the analytically best ones (disaggregated: the best one
# per role: its sides are sized separately, so the best per-GPU TP of each role is the one to pair)
RATIOS = 2  # P:D ratios simulated: the ones nearest the analytical balance
MAX_SIDE = 4  # most instances of one role in a disaggregated candidate
SEARCH_STEPS = 3  # bisections of the rate bracket (log scale, 2x wide): ~9% resolution
MAX_REQUESTS = 1000  # simulated requests per run at most (a longer window than that: the cap is the limit)
# The seed article's scenarios: (name, prompt range, output range).
SEED_SCENARIOS = [("search", (50, 500), (5, 20)), ("chatbot", (2000, 4000), (200, 500)),
                  ("2k/256 example", (2048, 2048), (256, 256))]


@dataclass
class MapInput:
    model: str
    gpus: list[str]
    link: str
    slo: SLO
    prompts: list[int]
    outputs: list[int]
    target: float = 0.9
    num_requests: int = 60  # simulated per candidate and rate at least (more at high rates)
    prices: dict[str, float] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Best:
    label: str
    gpus: int
    cost: float  # USD per hour
    goodput: float  # req/s
    per_gpu: float  # req/s per GPU
    per_dollar: float  # requests per USD
    capped: bool = False  # the goodput reached the simulation cap (rate_cap): a lower bound

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _specs(prompt: int, output: int, n: int, rate: float, seed: int) -> list[RequestSpec]:
    return [RequestSpec(t, prompt, output) for t in arrival_times(n, rate, seed=seed)]


def window_s(inp: MapInput, output: int) -> float:
    """How long arrivals must last for an overload to show: two TTFT SLOs, and one request's life at
    the TPOT SLO (decode's batch fills only then); a short burst at any rate fits in the queues."""
    return max(2 * (inp.slo.ttft_ms or 1000.0), output * (inp.slo.tpot_ms or 50.0)) / 1000.0


def rate_cap(inp: MapInput, output: int) -> float:
    """The highest rate a full window can be simulated at within MAX_REQUESTS."""
    return MAX_REQUESTS / window_s(inp, output)


def _meets(cfg: SimConfig, inp: MapInput, prompt: int, output: int, rate: float) -> bool:
    if rate > rate_cap(inp, output):
        return False  # not testable in a full window: counted as missed (goodput capped, flagged)
    n = int(max(inp.num_requests, rate * window_s(inp, output)))
    r = build(cfg).run(_specs(prompt, output, n, rate, inp.seed))
    return float(attainment(r, inp.slo).mean()) >= inp.target


def goodput(cfg: SimConfig, inp: MapInput, prompt: int, output: int, guess: float) -> float:
    """Highest rate meeting the SLOs, searched from the analytical `guess` (0: none meets them)."""
    lo, hi = 0.0, guess
    for _ in range(8):  # bracket: [lo meets, hi does not]
        if not _meets(cfg, inp, prompt, output, hi):
            break
        lo, hi = hi, hi * 2
    else:
        return lo
    while lo == 0.0 and hi > guess / 256:
        if _meets(cfg, inp, prompt, output, hi / 2):
            lo = hi / 2
        else:
            hi /= 2
    if lo == 0.0:
        return 0.0
    for _ in range(SEARCH_STEPS):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _meets(cfg, inp, prompt, output, mid) else (lo, mid)
    return lo


def _best(found: list[tuple[SimConfig, float]], cap: float) -> tuple[Best | None, Best | None]:
    """(best per GPU, best per dollar) among (config, goodput)."""
    rows = [Best(c.label(), c.num_gpus, c.cost_per_hour(), g, g / c.num_gpus, g * 3600 / c.cost_per_hour(),
                 g * 2 ** (1 / 2 ** SEARCH_STEPS) * 1.01 >= cap) for c, g in found if g > 0]
    if not rows:
        return None, None
    return max(rows, key=lambda b: b.per_gpu), max(rows, key=lambda b: b.per_dollar)


def _ratios(ideal: float) -> list[tuple[int, int]]:
    """(prefill, decode) counts whose ratio is nearest `ideal` = prefill instances per decode one."""
    pairs = {(p, d) for p in range(1, MAX_SIDE + 1) for d in range(1, MAX_SIDE + 1) if math.gcd(p, d) == 1}
    return sorted(pairs, key=lambda pd: (abs(math.log(pd[0] / pd[1] / ideal)), pd[0] + pd[1]))[:RATIOS]


def map_point(inp: MapInput, prompt: int, output: int) -> dict[str, Any]:
    """Best disaggregated and colocated configurations at one (prompt, output) point."""
    shape = resolve_shape(inp.model)
    tpot = inp.slo.tpot_ms
    pre = max(((prefill_capacity(shape, g, tp, prompt) / tp, g, tp) for g in inp.gpus for tp in _tps(shape, g)),
              default=None)
    dec = max(((decode_capacity(shape, g, tp, prompt, output, tpot) / tp, g, tp)
               for g in inp.gpus for tp in _tps(shape, g)), default=None)
    dis: list[tuple[SimConfig, float]] = []
    if pre and dec and pre[0] > 0 and dec[0] > 0:
        (pcap, gp, tpp), (dcap, gd, tpd) = pre, dec
        pc, dc = pcap * tpp, dcap * tpd  # per instance
        for p, d in _ratios(dc / pc):
            cfg = _plan_base(inp, mode="disagg", num_prefill=p, num_decode=d, prefill_gpu=gp,
                             decode_gpu=gd, tp_prefill=tpp, tp_decode=tpd)
            dis.append((cfg, goodput(cfg, inp, prompt, output, min(p * pc, d * dc))))
    # Colocated on as many GPUs as the disaggregated candidates use: the same statistical
    # multiplexing of requests over instances on both sides.
    gpus = max((c.num_gpus for c, _ in dis), default=8)
    cands = []
    for g in inp.gpus:
        for tp in _tps(shape, g):
            pc, dc = prefill_capacity(shape, g, tp, prompt), decode_capacity(shape, g, tp, prompt, output, tpot)
            if pc > 0 and dc > 0:
                cands.append((1 / (1 / pc + 1 / dc) / tp, g, tp))
    col: list[tuple[SimConfig, float]] = []
    for cap, g, tp in sorted(cands, reverse=True)[:TOP_TP * len(inp.gpus)]:
        n = max(1, min(MAX_SIDE, round(gpus / tp)))
        cfg = _plan_base(inp, mode="colocated", num_colocated=n, prefill_gpu=g, tp_prefill=tp)
        col.append((cfg, goodput(cfg, inp, prompt, output, n * cap * tp)))
    cap = rate_cap(inp, output)
    (dg, dd), (cg, cd) = _best(dis, cap), _best(col, cap)
    return {"prompt": prompt, "output": output,
            "disagg": dg and dg.as_dict(), "colocated": cg and cg.as_dict(),
            "disagg_per_dollar": dd and dd.as_dict(), "colocated_per_dollar": cd and cd.as_dict(),
            "ratio_per_gpu": _ratio(dg and dg.per_gpu, cg and cg.per_gpu),
            "ratio_per_dollar": _ratio(dd and dd.per_dollar, cd and cd.per_dollar),
            "capped": bool((dg and dg.capped) or (cg and cg.capped)), "simulated": len(dis) + len(col)}


def _plan_base(inp: MapInput, **kw: Any) -> SimConfig:
    from pdserve.sim.planner import PlanInput

    return _base(PlanInput(inp.model, 1.0, [], inp.slo, inp.gpus, inp.target, inp.link, inp.prices), **kw)


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a and not b:
        return None
    if not b:
        return math.inf
    return (a or 0.0) / b


def run_map(inp: MapInput, progress: bool = True) -> dict[str, Any]:
    """Every grid point (prompt-major), with a tqdm bar on stderr when `progress`."""
    from tqdm import tqdm

    grid = [(p, o) for p in inp.prompts for o in inp.outputs]
    t0 = time.process_time()
    points = [map_point(inp, p, o) for p, o in tqdm(grid, desc="plan --map", unit="point", disable=not progress)]
    return {"model": inp.model, "gpus": inp.gpus, "link": inp.link, "slo": inp.slo.as_dict(), "target": inp.target,
            "num_requests": inp.num_requests, "max_requests": MAX_REQUESTS,
            "rate_cap": {o: rate_cap(inp, o) for o in inp.outputs}, "prompts": inp.prompts, "outputs": inp.outputs,
            "seed_scenarios": [{"name": n, "prompt": list(p), "output": list(o)} for n, p, o in SEED_SCENARIOS],
            "points": points, "cpu_s": time.process_time() - t0}


def format_map(res: dict[str, Any], key: str = "ratio_per_gpu") -> str:
    """The ratio as a table: rows are output lengths, columns prompt lengths."""
    cells = {(pt["prompt"], pt["output"]): pt[key] for pt in res["points"]}
    capped = {(pt["prompt"], pt["output"]): pt["capped"] for pt in res["points"]}
    lines = [f"{res['model']} on {','.join(res['gpus'])}, link {res['link']}, SLO {res['slo']} for "
             f"{res['target']:.0%}: disaggregated / colocated goodput {key.removeprefix('ratio_').replace('_', ' ')}",
             "output\\prompt " + "".join(f"{p:>8}" for p in res["prompts"])]
    lines[0] += " (*: a side reached the simulation cap; the ratio is uncertain)"
    for o in res["outputs"]:
        row = "".join(f"{_fmt(cells[(p, o)]) + ('*' if capped[(p, o)] else ''):>8}" for p in res["prompts"])
        lines.append(f"{o:>14}{row}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else "inf" if math.isinf(x) else f"{x:.2f}"


def plot_map(res: dict[str, Any], path: str) -> None:
    """Two heatmaps (per GPU, per dollar) of log2(disaggregated / colocated), seed scenarios marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ps, os_ = res["prompts"], res["outputs"]
    xe = _edges(ps)
    ye = _edges(os_)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key in zip(axes, ("ratio_per_gpu", "ratio_per_dollar"), strict=True):
        z = np.full((len(os_), len(ps)), np.nan)
        for pt in res["points"]:
            v = pt[key]
            if v is not None:
                z[os_.index(pt["output"]), ps.index(pt["prompt"])] = math.log2(min(max(v, 1 / 16), 16))
        mesh = ax.pcolormesh(xe, ye, z, cmap="RdBu", vmin=-2, vmax=2, shading="flat")
        for pt in res["points"]:
            v = pt[key]
            x, y = ps.index(pt["prompt"]), os_.index(pt["output"])
            label = _fmt(v) + ("*" if pt["capped"] else "")
            ax.text(math.sqrt(xe[x] * xe[x + 1]), math.sqrt(ye[y] * ye[y + 1]), label, ha="center",
                    va="center", fontsize=7, color="dimgray" if pt["capped"] else "black")
        for name, (p0, p1), (o0, o1) in SEED_SCENARIOS:
            if p0 == p1:
                ax.plot([p0], [o0], marker="*", color="gold", markersize=14, markeredgecolor="black")
                ax.annotate(name, (p0, o0), textcoords="offset points", xytext=(6, -12), fontsize=8)
            else:
                ax.add_patch(plt.Rectangle((p0, o0), p1 - p0, o1 - o0, fill=False, lw=2, ec="black", ls="--"))
                ax.annotate(name, (p0, o1), textcoords="offset points", xytext=(2, 3), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("output tokens")
        ax.set_title(f"goodput {key.removeprefix('ratio_').replace('_', ' ')}: disagg / colocated")
        fig.colorbar(mesh, ax=ax, label="log2 ratio (blue: disaggregation pays)")
    fig.suptitle(f"{res['model']} on {','.join(res['gpus'])}, {res['link']}, SLO {res['slo']} "
                 f"for {res['target']:.0%} (best P:D and TP per point vs best colocated; "
                 f"*: a side hit the simulation cap, ratio uncertain)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _edges(xs: list[int]) -> list[float]:
    """Cell edges on a log axis: geometric midpoints, the ends mirrored."""
    mids = [math.sqrt(a * b) for a, b in zip(xs, xs[1:], strict=False)]
    first = xs[0] ** 2 / mids[0] if mids else xs[0] / 2
    last = xs[-1] ** 2 / mids[-1] if mids else xs[0] * 2
    return [first, *mids, last]
