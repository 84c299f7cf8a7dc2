"""Serving results in `vllm bench serve`'s JSON layout, shared by `pdserve bench` and `pdserve sim`.

Pure arithmetic on per-request times (milliseconds, NaN where a request failed): no clock, no I/O.
Per request: TTFT = first token - arrival; TPOT = (E2EL - TTFT) / (outputs - 1), the mean gap after
the first token (undefined for 1-token outputs); ITL = every gap between consecutive streamed tokens;
E2EL = finish - arrival. TPOT weights each request once, ITL each gap once, so a long request moves
ITL percentiles more than TPOT ones. Goodput counts finished requests that meet every SLO given,
divided by the duration; attainment is that count over all requests sent (failures count as misses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
METRICS = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
           ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency"))


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    itl_ms: float | None = None  # a request's worst inter-token gap (streaming smoothness)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms),
                                  ("itl", self.itl_ms)) if v is not None}


def tpot_ms(ttft_ms: np.ndarray, e2el_ms: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
    """(E2EL - TTFT) / (outputs - 1) per request; NaN for 1-token outputs and failed requests."""
    outs = np.asarray(output_tokens, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(outs > 1, (np.asarray(e2el_ms) - np.asarray(ttft_ms)) / (outs - 1), np.nan)


def stats(name: str, xs: np.ndarray, out: dict[str, Any]) -> None:
    """mean/median/std/p90/p99 of the non-NaN values into `out` as `{stat}_{name}_ms` (0.0 when empty)."""
    xs = np.asarray(xs, dtype=float)
    xs = xs[~np.isnan(xs)]
    ok = xs.size > 0
    out[f"mean_{name}_ms"] = float(xs.mean()) if ok else 0.0
    out[f"median_{name}_ms"] = float(np.median(xs)) if ok else 0.0
    out[f"std_{name}_ms"] = float(xs.std()) if ok else 0.0
    for p in PERCENTILES[1:]:
        out[f"p{p}_{name}_ms"] = float(np.percentile(xs, p)) if ok else 0.0


def attainment(ttft: np.ndarray, tpot: np.ndarray, e2el: np.ndarray, slo: SLO,
               max_itl: np.ndarray | None = None) -> np.ndarray:
    """Boolean per request: finished and within every SLO (TPOT and ITL are vacuous for 1-token
    outputs). `max_itl` is each request's worst gap; without it an ITL SLO cannot be judged."""
    m = {"ttft": np.asarray(ttft, dtype=float), "tpot": np.asarray(tpot, dtype=float),
         "e2el": np.asarray(e2el, dtype=float)}
    if max_itl is not None:
        m["itl"] = np.asarray(max_itl, dtype=float)
    good = ~np.isnan(m["e2el"])
    for key, limit in slo.as_dict().items():
        if key not in m:
            raise ValueError(f"an SLO on {key} needs each request's {key}")
        v = m[key]
        good &= (np.isnan(v) | (v <= limit)) if key in ("tpot", "itl") else (v <= limit)
    return good


def summarize(ttft_ms: np.ndarray, e2el_ms: np.ndarray, itl_ms: np.ndarray, prompt_tokens: np.ndarray,
              output_tokens: np.ndarray, duration_s: float, slo: SLO | None = None,
              backend: str = "pdserve", max_itl_ms: np.ndarray | None = None) -> dict[str, Any]:
    """The summary dict; arrays are per request except `itl_ms` (every gap of every request).

    `max_itl_ms`: each request's worst gap (NaN without one), for an ITL SLO and its percentiles.
    """
    ttft = np.asarray(ttft_ms, dtype=float)
    e2el = np.asarray(e2el_ms, dtype=float)
    tpot = tpot_ms(ttft, e2el, output_tokens)
    done = ~np.isnan(e2el)
    n_done = int(done.sum())
    dur = max(float(duration_s), 1e-9)
    out_tok = int(np.asarray(output_tokens)[done].sum())
    in_tok = int(np.asarray(prompt_tokens)[done].sum())
    res: dict[str, Any] = {
        "backend": backend,
        "num_prompts": int(ttft.size),
        "duration": float(duration_s),
        "completed": n_done,
        "failed": int(ttft.size) - n_done,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": n_done / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
    }
    if slo is not None and slo.as_dict():
        good = attainment(ttft, tpot, e2el, slo, max_itl_ms)
        res["request_goodput"] = float(good.sum()) / dur
        res["slo_attainment"] = float(good.sum()) / max(1, ttft.size)
        res["slo"] = slo.as_dict()
    for key, xs in (("ttft", ttft), ("tpot", tpot), ("itl", np.asarray(itl_ms, dtype=float)), ("e2el", e2el)):
        stats(key, xs, res)
    if max_itl_ms is not None:
        stats("max_itl", np.asarray(max_itl_ms, dtype=float), res)
    return res


def format_summary(res: dict[str, Any], title: str = "Serving Benchmark Result") -> list[str]:
    """The `vllm bench serve` text block, as lines (callers append their own footer)."""
    lines = [f"{' ' + title + ' ':=^60}"]

    def row(label: str, v: Any) -> None:
        lines.append(f"{label:<44}{v:>16.2f}" if isinstance(v, float) else f"{label:<44}{v:>16}")

    row("Successful requests:", res["completed"])
    if res.get("failed"):
        row("Failed requests:", res["failed"])
    row("Benchmark duration (s):", res["duration"])
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", res["request_throughput"])
    if "request_goodput" in res:
        row("Request goodput (req/s):", res["request_goodput"])
        row("SLO attainment:", res["slo_attainment"])
    row("Output token throughput (tok/s):", res["output_throughput"])
    row("Total token throughput (tok/s):", res["total_token_throughput"])
    for key, name in METRICS:
        lines.append(f"{name:-^60}")
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {key.upper()} (ms):", res[f"{stat}_{key}_ms"])
    lines.append("=" * 60)
    return lines
