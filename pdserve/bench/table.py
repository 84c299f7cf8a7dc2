"""The side-by-side table of `pdserve bench compare`: each metric per rate, the ratio, the winner."""

from __future__ import annotations

from typing import Any

# (summary key, label, True when higher is better)
ROWS: tuple[tuple[str, str, bool], ...] = (
    ("request_goodput", "goodput (req/s)", True),
    ("slo_attainment", "SLO attainment", True),
    ("request_throughput", "throughput (req/s)", True),
    ("median_ttft_ms", "median TTFT (ms)", False),
    ("p99_ttft_ms", "p99 TTFT (ms)", False),
    ("median_tpot_ms", "median TPOT (ms)", False),
    ("p99_tpot_ms", "p99 TPOT (ms)", False),
    ("p99_itl_ms", "p99 ITL (ms)", False),
    ("p99_max_itl_ms", "p99 worst gap (ms)", False),
    ("mean_e2el_ms", "mean E2EL (ms)", False),
)
TIE = 0.05  # within 5% either way: no winner


def winner(col: float, dis: float, higher_better: bool) -> str:
    if col == dis or max(abs(col), abs(dis)) == 0:
        return "~"
    rel = abs(dis - col) / max(abs(col), abs(dis))
    if rel <= TIE:
        return "~"
    return "disagg" if (dis > col) == higher_better else "colocated"


def slo_rate(runs: list[dict[str, Any]], target: float = 0.9) -> float:
    """DistServe's goodput: the highest rate of the sweep at which >= target of requests met the SLOs."""
    ok = [r["rate"] for r in runs if r["summary"].get("slo_attainment", 0.0) >= target]
    return max(ok, default=0.0)


def mean_busy(summary: dict[str, Any]) -> float:
    b = summary.get("worker_busy_fraction") or {}
    return sum(b.values()) / len(b) if b else float("nan")


def format_table(payload: dict[str, Any]) -> str:
    col, dis = payload["modes"]["colocated"], payload["modes"]["disaggregated"]
    slo = payload["config"]
    lines = [f"colocated = {col['label']}, disagg = {dis['label']}; SLO TTFT {slo['slo_ttft_ms']} ms, "
             f"TPOT {slo['slo_tpot_ms']} ms, worst gap {slo.get('slo_itl_ms')} ms; ratio = disagg / colocated",
             f"{'rate':>5}  {'metric':<20}{'colocated':>11}{'disagg':>11}{'ratio':>8}  better"]
    for rc, rd in zip(col["runs"], dis["runs"], strict=True):
        sc, sd = rc["summary"], rd["summary"]
        for key, label, hib in ROWS:
            if key not in sc:
                continue
            a, b = float(sc[key]), float(sd[key])
            ratio = f"{b / a:.2f}x" if a else "-"
            lines.append(f"{rc['rate']:>5g}  {label:<20}{a:>11.2f}{b:>11.2f}{ratio:>8}  {winner(a, b, hib)}")
        lines.append(f"{rc['rate']:>5g}  {'mean worker busy':<20}{mean_busy(sc):>11.0%}{mean_busy(sd):>11.0%}")
        lines.append(f"{rc['rate']:>5g}  {'prefix cache hits':<20}{sc.get('prefix_cache_hit_rate', 0):>11.0%}"
                     f"{sd.get('prefix_cache_hit_rate', 0):>11.0%}")
        lines.append("")
    gc, gd = slo_rate(col["runs"]), slo_rate(dis["runs"])
    ratio = f"{gd / gc:.2f}x" if gc else ("inf" if gd else "-")
    lines.append(f"goodput (highest swept rate with >= 90% SLO attainment): colocated {gc:g} req/s, "
                 f"disagg {gd:g} req/s, ratio {ratio}")
    return "\n".join(lines)
