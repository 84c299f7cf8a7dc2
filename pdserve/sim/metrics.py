"""Simulation results in `vllm bench serve`'s JSON layout (the layout `pdserve bench` writes too).

The arithmetic (TTFT, TPOT, ITL, E2EL, goodput, attainment) lives in `pdserve.metrics_summary`,
shared with the real benchmark client; this module adapts a `SimResult` to it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pdserve.metrics_summary import PERCENTILES, SLO, tpot_ms
from pdserve.metrics_summary import attainment as _attainment
from pdserve.metrics_summary import format_summary as _format_lines
from pdserve.metrics_summary import summarize as _summarize
from pdserve.sim.cluster import SimResult

__all__ = ["PERCENTILES", "SLO", "attainment", "format_summary", "per_request_ms", "summarize"]


def per_request_ms(r: SimResult) -> dict[str, np.ndarray]:
    arr = np.asarray(r.arrival)
    ttft = (np.asarray(r.first_token) - arr) * 1e3
    e2el = (np.asarray(r.finish) - arr) * 1e3
    return {"ttft": ttft, "tpot": tpot_ms(ttft, e2el, np.asarray(r.output)), "e2el": e2el}


def attainment(r: SimResult, slo: SLO) -> np.ndarray:
    """Boolean per request: finished and within every SLO (TPOT is vacuous for 1-token outputs)."""
    m = per_request_ms(r)
    return _attainment(m["ttft"], m["tpot"], m["e2el"], slo)


def summarize(r: SimResult, slo: SLO | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    m = per_request_ms(r)
    itl = np.frombuffer(r.itls, dtype=float) * 1e3 if len(r.itls) else np.zeros(0)
    res: dict[str, Any] = {"date": None}
    worst = np.asarray(r.max_itl, dtype=float) * 1e3 if r.max_itl else None
    res.update(_summarize(m["ttft"], m["e2el"], itl, np.asarray(r.prompt), np.asarray(r.output),
                          r.duration, slo, backend="pdserve-sim", max_itl_ms=worst))
    res["instances"] = r.instances
    res["links"] = r.ports
    res["num_preemptions"] = r.num_preemptions
    res["num_rejected"] = r.num_rejected  # 503s at the router: no decode instance could reserve
    res["sim_wall_s"] = r.wall_s
    res["sim_events"] = r.num_events
    if extra:
        res.update(extra)
    return res


def format_summary(res: dict[str, Any]) -> str:
    """The `vllm bench serve` text block."""
    lines = _format_lines(res, "Serving Benchmark Result (simulated)")
    busy = [v["busy_frac"] for v in res["instances"].values()]
    if busy:
        lines.append(f"instance busy: mean {np.mean(busy):.0%}, max {max(busy):.0%}; "
                     f"preemptions {res['num_preemptions']}")
    if res.get("num_rejected"):
        lines.append(f"rejected at the router (503, every decode instance full): {res['num_rejected']}")
    if res["links"]:
        bw = [v["bandwidth_util"] for v in res["links"].values()]
        lines.append(f"link bandwidth used: mean {np.mean(bw):.1%}, max {max(bw):.1%} of each port's limit")
    lines.append(f"simulated {res['num_prompts']} requests in {res['sim_wall_s']:.2f} s wall "
                 f"({res['sim_events']:,} events)")
    return "\n".join(lines)


def isfinite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
