"""Capacity planner (`pdserve plan`): the cheapest cluster that meets the SLOs at a request rate.

Search, per mode:
  1. enumerate GPU type and TP degree per role (TP from the smallest that holds the weights to 8);
  2. an analytical lower bound on instance counts from each instance's saturated throughput
     (prefill tokens/s at a full batch; decode tokens/s at the largest batch whose step fits the
     TPOT SLO) gives a lower-bound cost; candidates are visited cheapest bound first and pruned
     once the bound reaches the best cost found (branch and bound);
  3. each candidate is simulated with a capped number of requests; the side that missed its SLO
     (TTFT -> prefill, TPOT -> decode) grows by one instance until the SLOs hold; then each
     side shrinks by one while they still hold, so no one instance fewer would do.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

from pdserve.config.model import ModelShape, resolve_shape
from pdserve.sim.build import GPU_SCALE, SimConfig, build
from pdserve.sim.hardware import get_gpu
from pdserve.sim.metrics import SLO, attainment, per_request_ms
from pdserve.sim.perf_model import RooflineModel, min_tp
from pdserve.workload import RequestSpec

MAX_GROW = 12  # simulations per candidate before giving up on it


@dataclass
class PlanInput:
    model: str
    rate: float
    specs: list[RequestSpec]  # lengths (and order) of the requests; re-timed at `rate` by the caller
    slo: SLO
    gpus: list[str] = field(default_factory=lambda: ["h100"])
    target: float = 0.9  # share of requests that must meet every SLO
    link: str = "cx7-400g"
    prices: dict[str, float] = field(default_factory=dict)
    max_instances: int = 64


@dataclass
class PlanResult:
    config: SimConfig
    cost: float
    attainment: float
    p90_ttft_ms: float
    p90_tpot_ms: float
    simulations: int


def _tps(shape: ModelShape, gpu: str) -> list[int]:
    g = get_gpu(gpu)
    lo = min_tp(shape, g)
    return [] if lo is None else [t for t in (1, 2, 4, 8) if lo <= t <= g.max_tp]


def _means(specs: list[RequestSpec]) -> tuple[float, float]:
    return (sum(s.prompt_tokens for s in specs) / len(specs), sum(s.output_tokens for s in specs) / len(specs))


def prefill_capacity(shape: ModelShape, gpu: str, tp: int, prompt: float, batch_tokens: int = 8192) -> float:
    """Requests/s one prefill instance sustains with full batches of `prompt`-token requests."""
    k = max(1, int(batch_tokens // max(1.0, prompt)))
    return k / RooflineModel(shape, get_gpu(gpu), tp).prefill_time([int(prompt)] * k)


def decode_capacity(shape: ModelShape, gpu: str, tp: int, prompt: float, output: float,
                    tpot_ms: float | None, max_seqs: int = 256) -> float:
    """Requests/s one decode instance sustains: the largest batch within the TPOT SLO."""
    m = RooflineModel(shape, get_gpu(gpu), tp)
    ctx = int(prompt + output / 2)
    best = 0.0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if b > max_seqs:
            break
        t = m.decode_time([ctx] * b)
        if tpot_ms is not None and t * 1e3 > tpot_ms and b > 1:
            break
        best = b / t / output
    return best


def _evaluate(cfg: SimConfig, inp: PlanInput) -> tuple[float, float, float, str]:
    """Simulate; return (attainment, p90 TTFT, p90 TPOT, which side to grow)."""
    r = build(cfg).run(inp.specs)
    att = float(attainment(r, inp.slo).mean())
    m = per_request_ms(r)
    ttft = _p90(m["ttft"])
    tpot = _p90(m["tpot"])
    ttft_miss = inp.slo.ttft_ms is not None and not ttft <= inp.slo.ttft_ms
    return att, ttft, tpot, "prefill" if ttft_miss else "decode"


def _p90(xs: Any) -> float:
    import numpy as np

    xs = xs[~np.isnan(xs)]
    return float(np.percentile(xs, 90)) if xs.size else float("inf")


def _search(cands: list[tuple[float, SimConfig]], inp: PlanInput) -> PlanResult | None:
    best: PlanResult | None = None
    sims = 0
    for bound, cfg in sorted(cands, key=lambda c: c[0]):
        if best is not None and bound >= best.cost:
            break  # every remaining candidate costs at least this much
        for _ in range(MAX_GROW):
            cost = cfg.cost_per_hour()
            if best is not None and cost >= best.cost:
                break
            att, ttft, tpot, grow = _evaluate(cfg, inp)
            sims += 1
            if att >= inp.target:
                cfg, (att, ttft, tpot), n = _shrink(cfg, (att, ttft, tpot), inp)
                sims += n
                best = PlanResult(cfg, cfg.cost_per_hour(), att, ttft, tpot, sims)
                break
            if cfg.mode == "colocated":
                cfg = cfg.with_workers(colocated=cfg.num_colocated + 1)
            elif grow == "prefill":
                cfg = cfg.with_workers(prefill=cfg.num_prefill + 1)
            else:
                cfg = cfg.with_workers(decode=cfg.num_decode + 1)
            if cfg.num_gpus > inp.max_instances * 8:
                break
    if best is not None:
        best.simulations = sims
    return best


def _shrink(cfg: SimConfig, result: tuple[float, float, float], inp: PlanInput
            ) -> tuple[SimConfig, tuple[float, float, float], int]:
    """Drop instances while the SLOs still hold: the analytical start can already be above what
    is needed, and growing never takes one away. Returns the config, its result, simulations run."""
    sims = 0
    roles = ("colocated",) if cfg.mode == "colocated" else ("prefill", "decode")
    shrunk = True
    while shrunk:
        shrunk = False
        for role in roles:
            n = getattr(cfg, f"num_{role}")
            if n <= 1:
                continue
            smaller = cfg.with_workers(**{role: n - 1})
            att, ttft, tpot, _ = _evaluate(smaller, inp)
            sims += 1
            if att >= inp.target:
                cfg, result, shrunk = smaller, (att, ttft, tpot), True
    return cfg, result, sims


def _base(inp: PlanInput, **kw: Any) -> SimConfig:
    cfg = SimConfig.of(model=inp.model, link=inp.link, serving=GPU_SCALE, **kw)
    return replace(cfg, price_prefill=inp.prices.get(cfg.prefill_gpu), price_decode=inp.prices.get(cfg.decode_gpu))


def plan_disagg(inp: PlanInput) -> PlanResult | None:
    shape = resolve_shape(inp.model)
    prompt, output = _means(inp.specs)
    cands = []
    for gp, gd in itertools.product(inp.gpus, inp.gpus):
        for tp_p, tp_d in itertools.product(_tps(shape, gp), _tps(shape, gd)):
            pc = prefill_capacity(shape, gp, tp_p, prompt)
            dc = decode_capacity(shape, gd, tp_d, prompt, output, inp.slo.tpot_ms)
            if pc <= 0 or dc <= 0:
                continue
            # 0.8: the bounds are estimates; start a little below them and let simulation grow.
            p, d = max(1, math.ceil(0.8 * inp.rate / pc)), max(1, math.ceil(0.8 * inp.rate / dc))
            cfg = _base(inp, mode="disagg", num_prefill=p, num_decode=d, prefill_gpu=gp, decode_gpu=gd,
                        tp_prefill=tp_p, tp_decode=tp_d)
            cands.append((cfg.cost_per_hour(), cfg))
    return _search(cands, inp)


def plan_colocated(inp: PlanInput) -> PlanResult | None:
    shape = resolve_shape(inp.model)
    prompt, output = _means(inp.specs)
    cands = []
    for g in inp.gpus:
        for tp in _tps(shape, g):
            # Each request costs its prefill time plus its decode time at a full batch.
            per_req = 1 / prefill_capacity(shape, g, tp, prompt) + 1 / decode_capacity(
                shape, g, tp, prompt, output, inp.slo.tpot_ms)
            n = max(1, math.ceil(0.8 * inp.rate * per_req))
            cfg = _base(inp, mode="colocated", num_colocated=n, prefill_gpu=g, tp_prefill=tp)
            cands.append((cfg.cost_per_hour(), cfg))
    return _search(cands, inp)


def retime(specs: list[RequestSpec], rate: float, seed: int = 0) -> list[RequestSpec]:
    from pdserve.workload import arrival_times

    times = arrival_times(len(specs), rate, seed=seed)
    return [RequestSpec(t, s.prompt_tokens, s.output_tokens) for t, s in zip(times, specs, strict=True)]


def format_plan(dis: PlanResult | None, col: PlanResult | None, inp: PlanInput) -> str:
    lines = [f"plan: {inp.model} at {inp.rate:g} req/s, SLO {inp.slo.as_dict()} for {inp.target:.0%} of requests "
             f"({len(inp.specs)} simulated requests per candidate)"]
    for name, r in (("disaggregated", dis), ("colocated", col)):
        if r is None:
            lines.append(f"  {name:<14} no configuration met the SLOs")
            continue
        margin = ", ".join(
            f"{k} p90 {v:.0f} ms vs {lim:.0f} ms ({(lim - v) / lim:+.0%} margin)"
            for k, v, lim in (("TTFT", r.p90_ttft_ms, inp.slo.ttft_ms), ("TPOT", r.p90_tpot_ms, inp.slo.tpot_ms))
            if lim is not None)
        lines.append(f"  {name:<14} {r.config.label()}: {r.config.num_gpus} GPUs, ${r.cost:.2f}/h, "
                     f"attainment {r.attainment:.0%}; {margin}")
    if dis and col:
        lines.append(f"  colocated / disaggregated cost = {col.cost / dis.cost:.2f}x "
                     f"({'disaggregation pays' if dis.cost < col.cost else 'colocated is cheaper' if col.cost < dis.cost else 'equal cost'})")
    return "\n".join(lines)
