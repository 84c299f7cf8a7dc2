"""Simulation results in `vllm bench serve`'s JSON layout (the layout `pdserve bench` writes too).

Per request: TTFT = first token - arrival; TPOT = (E2E - TTFT) / (outputs - 1); ITL = every gap
between consecutive tokens; E2EL = finish - arrival. Goodput counts requests meeting every SLO given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdserve.sim.cluster import SimResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms))
                if v is not None}


def _stats(name: str, xs: np.ndarray, out: dict[str, Any]) -> None:
    xs = xs[~np.isnan(xs)] if xs.size else xs
    ok = xs.size > 0
    out[f"mean_{name}_ms"] = float(xs.mean()) if ok else 0.0
    out[f"median_{name}_ms"] = float(np.median(xs)) if ok else 0.0
    out[f"std_{name}_ms"] = float(xs.std()) if ok else 0.0
    for p in PERCENTILES[1:]:
        out[f"p{p}_{name}_ms"] = float(np.percentile(xs, p)) if ok else 0.0


def per_request_ms(r: SimResult) -> dict[str, np.ndarray]:
    arr = np.asarray(r.arrival)
    ft = np.asarray(r.first_token)
    fin = np.asarray(r.finish)
    outs = np.asarray(r.output, dtype=float)
    ttft = (ft - arr) * 1e3
    e2el = (fin - arr) * 1e3
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(outs > 1, (e2el - ttft) / (outs - 1), np.nan)
    return {"ttft": ttft, "tpot": tpot, "e2el": e2el}


def attainment(r: SimResult, slo: SLO) -> np.ndarray:
    """Boolean per request: finished and within every SLO (TPOT is vacuous for 1-token outputs)."""
    m = per_request_ms(r)
    good = ~np.isnan(m["e2el"])
    for key, limit in slo.as_dict().items():
        v = m[key]
        good &= np.isnan(v) | (v <= limit) if key == "tpot" else (v <= limit)
    return good


def summarize(r: SimResult, slo: SLO | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    m = per_request_ms(r)
    done = ~np.isnan(m["e2el"])
    n_done = int(done.sum())
    dur = r.duration
    out_tok = int(np.asarray(r.output)[done].sum())
    in_tok = int(np.asarray(r.prompt)[done].sum())
    res: dict[str, Any] = {
        "date": None,
        "backend": "pdserve-sim",
        "num_prompts": len(r.arrival),
        "duration": dur,
        "completed": n_done,
        "failed": len(r.arrival) - n_done,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": n_done / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
    }
    if slo is not None and slo.as_dict():
        good = attainment(r, slo)
        res["request_goodput"] = float(good.sum()) / dur
        res["slo_attainment"] = float(good.sum()) / max(1, len(r.arrival))
        res["slo"] = slo.as_dict()
    for key in ("ttft", "tpot", "e2el"):
        _stats(key, m[key], res)
    _stats("itl", np.frombuffer(r.itls, dtype=float) * 1e3 if len(r.itls) else np.zeros(0), res)
    res["instances"] = r.instances
    res["links"] = r.ports
    res["num_preemptions"] = r.num_preemptions
    res["sim_wall_s"] = r.wall_s
    res["sim_events"] = r.num_events
    if extra:
        res.update(extra)
    return res


def format_summary(res: dict[str, Any]) -> str:
    """The `vllm bench serve` text block."""
    lines = [f"{' Serving Benchmark Result (simulated) ':=^60}"]

    def row(label: str, v: Any) -> None:
        lines.append(f"{label:<44}{v:>16.2f}" if isinstance(v, float) else f"{label:<44}{v:>16}")

    row("Successful requests:", res["completed"])
    row("Benchmark duration (s):", res["duration"])
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", res["request_throughput"])
    if "request_goodput" in res:
        row("Request goodput (req/s):", res["request_goodput"])
        row("SLO attainment:", res["slo_attainment"])
    row("Output token throughput (tok/s):", res["output_throughput"])
    row("Total token throughput (tok/s):", res["total_token_throughput"])
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{title:-^60}")
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat != 'p90' and stat != 'p99' else stat.upper()} {key.upper()} (ms):",
                res[f"{stat}_{key}_ms"])
    busy = [v["busy_frac"] for v in res["instances"].values()]
    lines.append("=" * 60)
    if busy:
        lines.append(f"instance busy: mean {np.mean(busy):.0%}, max {max(busy):.0%}; "
                     f"preemptions {res['num_preemptions']}")
    if res["links"]:
        bw = [v["bandwidth_util"] for v in res["links"].values()]
        lines.append(f"link bandwidth used: mean {np.mean(bw):.1%}, max {max(bw):.1%} of each port's limit")
    lines.append(f"simulated {res['num_prompts']} requests in {res['sim_wall_s']:.2f} s wall "
                 f"({res['sim_events']:,} events)")
    return "\n".join(lines)


def isfinite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
