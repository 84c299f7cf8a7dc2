"""Pool several `pdserve bench compare` runs of one workload and SLO, rate by rate.

One run of 16-64 requests measures SLO attainment in steps of 2-6%, so DistServe's goodput (the
highest swept rate with >= 90% attainment) of a single run jumps between neighbouring rates from
one run to the next. Pooling the requests of every run at a rate gives each rate 100+ requests;
a Wilson interval says how sure each pooled attainment is of being on its side of the target.
"""

from __future__ import annotations

import math
from typing import Any


def wilson(met: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion met/n (95% for z=1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = met / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def same_slo(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """The SLO every payload shares (ValueError otherwise: pooled attainments must mean one thing)."""
    keys = ("workload", "slo_ttft_ms", "slo_tpot_ms", "slo_itl_ms", "length_scale", "workers")
    first = {k: payloads[0]["config"].get(k) for k in keys}
    for p in payloads[1:]:
        other = {k: p["config"].get(k) for k in keys}
        if other != first:
            raise ValueError(f"runs differ in workload or SLO: {first} vs {other}")
    return first


def pool(payloads: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per mode, per rate (ascending): requests, how many met every SLO, attainment and its interval."""
    same_slo(payloads)
    counts: dict[str, dict[float, list[int]]] = {}
    for p in payloads:
        for mode, m in p["modes"].items():
            for run in m["runs"]:
                s = run["summary"]
                n = int(s["num_prompts"])
                c = counts.setdefault(mode, {}).setdefault(float(run["rate"]), [0, 0, 0])
                c[0] += round(s["slo_attainment"] * n)
                c[1] += n
                c[2] += 1
    out: dict[str, list[dict[str, Any]]] = {}
    for mode, by_rate in counts.items():
        rows = []
        for rate in sorted(by_rate):
            met, n, runs = by_rate[rate]
            lo, hi = wilson(met, n)
            rows.append({"rate": rate, "runs": runs, "requests": n, "met": met,
                         "attainment": met / n, "interval95": [lo, hi]})
        out[mode] = rows
    return out


def goodput(rows: list[dict[str, Any]], target: float = 0.9) -> dict[str, float]:
    """DistServe's goodput over pooled attainments, two readings:
    `highest`: the highest rate at or above target (DistServe's definition);
    `before_first_miss`: the highest rate below which no rate misses (a dip counts).
    0.0: not even the lowest rate meets the target."""
    ok = [r["rate"] for r in rows if r["attainment"] >= target]
    below = 0.0
    for r in rows:
        if r["attainment"] < target:
            break
        below = r["rate"]
    return {"highest": max(ok, default=0.0), "before_first_miss": below}
