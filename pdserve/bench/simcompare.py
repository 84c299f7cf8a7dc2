"""The simulator on a recorded `pdserve bench compare`: every mode, every rate, the exact requests.

A compare JSON holds, per mode and rate, each request's arrival, prompt and output lengths and
its measured times. This replays those request lists through the simulated cluster `pdserve up`
would have started (sim_config: the schema's settings, the run's worker counts, the KV blocks
its workers get) with a measured profile, scores the simulated requests with the run's SLOs, and
sets prediction beside measurement: the winner at each rate (goodput), each mode's goodput, and
the TTFT / TPOT / ITL medians and p99s.
Serving overheads (what a served step and request cost beyond the engine's steps) come from the
profile's "serving" section if it has one; `overheads_from` measures them on one recorded run
(the lowest rate: requests mostly alone), as `pdserve calibrate` does on a run of its own; with
the prefill factors (`prefill_factors.py`, the served prompt step's extra time, inside the step) in
from the start when they are given.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.prefill_factors import prefill_budget
from pdserve.bench.simcheck import CheckRun, sim_config
from pdserve.metrics_summary import SLO
from pdserve.sim.build import build
from pdserve.sim.metrics import summarize
from pdserve.sim.profile import FACTOR_KEYS
from pdserve.workload import RequestSpec

MODES = {"colocated": "colocated", "disaggregated": "disagg"}  # compare's mode names -> sim's
METRICS = ("request_goodput", "slo_attainment", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
           "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "p99_max_itl_ms")
TIE = 0.05  # goodputs within 5% of each other (or both 0): neither mode wins


def specs_of(requests: list[dict[str, Any]]) -> list[RequestSpec]:
    """The recorded requests as the simulator's input (arrival as scheduled, not as sent)."""
    return [RequestSpec(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
            for r in sorted(requests, key=lambda r: r["arrival_s"])]


def slo_of(config: dict[str, Any]) -> SLO:
    return SLO(ttft_ms=config.get("slo_ttft_ms"), tpot_ms=config.get("slo_tpot_ms"), itl_ms=config.get("slo_itl_ms"))


def check_run(compare: dict[str, Any], mode: str, profile: str, link: str) -> CheckRun:
    c, w = compare["config"], compare["modes"][mode]["workers"]
    return CheckRun(model=c["model"], workload=c["workload"], workers=sum(w.values()),
                    prefill=w["prefill"] or 1, profile=profile, link=link)


def simulate(compare: dict[str, Any], mode: str, rate_index: int, profile: Any, link: str,
             serving_overheads: bool = True) -> dict[str, Any]:
    """One (mode, rate) of the compare through the simulator: its summary, scored with the run's SLOs.
    profile: a path, a path per mode, or a function of (mode, rate index) giving one."""
    run = compare["modes"][mode]["runs"][rate_index]
    if callable(profile):
        profile = profile(mode, rate_index)
    elif not isinstance(profile, str):
        profile = profile[mode]
    cfg = sim_config(MODES[mode], check_run(compare, mode, profile, link), serving_overheads)
    r = build(cfg).run(specs_of(run["requests"]))
    return summarize(r, slo_of(compare["config"]))


def temp_profile(profile: dict[str, Any]) -> str:
    """`profile` written to a temporary file (the caller removes it); returns its path."""
    f = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="pdserve-simcompare-", delete=False)
    with f:
        json.dump(profile, f)
    return f.name


def with_overheads(profile: str, overheads: dict[str, dict[str, float]]) -> str:
    """A temporary copy of `profile` with these serving overheads per sim mode; returns its path."""
    p = json.loads(Path(profile).read_text())
    p["serving"] = {**(p.get("serving") or {}), **overheads}
    return temp_profile(p)


def overheads_from(compare: dict[str, Any], profile: str, link: str, rate_index: int = 0,
                   factors: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """Per mode: step overhead = real - simulated median TPOT, then request overhead = real -
    simulated median TTFT (with the step overhead in), both floored at 0, on one rate's run.
    factors: per compare mode, the prefill factors (`prefill_factors.prefill_factors_from`), in
    the simulation from the start (so the request overhead is what the in-step part leaves) and
    in the result."""
    out: dict[str, dict[str, float]] = {}
    for mode in compare["modes"]:
        real = compare["modes"][mode]["runs"][rate_index]["summary"]
        extra = {k: (factors or {}).get(mode, {})[k] for k in FACTOR_KEYS if k in (factors or {}).get(mode, {})}
        path = with_overheads(profile, {MODES[mode]: {"step_overhead_s": 0.0, "request_overhead_s": 0.0, **extra}})
        try:
            bare = simulate(compare, mode, rate_index, path, link)
        finally:
            Path(path).unlink()
        step = max(0.0, (real["median_tpot_ms"] - bare["median_tpot_ms"]) / 1e3)
        path = with_overheads(profile, {MODES[mode]: {"step_overhead_s": step, "request_overhead_s": 0.0, **extra}})
        try:
            stepped = simulate(compare, mode, rate_index, path, link)
        finally:
            Path(path).unlink()
        request = max(0.0, (real["median_ttft_ms"] - stepped["median_ttft_ms"]) / 1e3)
        out[MODES[mode]] = {"step_overhead_s": step, "request_overhead_s": request, **extra,
                            "from_rate": compare["modes"][mode]["runs"][rate_index]["rate"]}
    return out


def prefill_budgets(compare: dict[str, Any]) -> dict[str, int]:
    """Per compare mode: the token budget of the worker that prefills, as `pdserve up` sets it."""
    return {m: prefill_budget(compare["config"]["model"], m) for m in ("colocated", "disaggregated")}


def scaled(profile: dict[str, Any], factor: float) -> dict[str, Any]:
    """The profile with every measured step time times `factor` (a machine that slow)."""
    return {**profile, "prefill": [[n, t * factor] for n, t in profile["prefill"]],
            "decode": [[b, c, t * factor] for b, c, t in profile["decode"]]}


def _bisect(f: Any, target: float, lo: float, hi: float, steps: int = 14, log: bool = False) -> float:
    """x in [lo, hi] with f(x) == target, f increasing (the end it reaches if the target is outside)."""
    for _ in range(steps):
        mid = (lo * hi) ** 0.5 if log else (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo * hi) ** 0.5 if log else (lo + hi) / 2


def slowdown_from(compare: dict[str, Any], profile: str, link: str, rate_index: int = 0
                  ) -> dict[str, dict[str, Any]]:
    """Per mode, on one rate's run: the factor on every profiled step time (the machine's contention
    during the run: a factor, where `overheads_from` adds a constant) that makes the simulated
    median TPOT the real one, then the request overhead that does the same for median TTFT (both
    solved by bisection, as queueing makes neither linear). Returns per mode the factor, the
    overhead and the path of the profile with both (a temporary file: the caller removes it)."""
    base = json.loads(Path(profile).read_text())
    out: dict[str, dict[str, Any]] = {}

    def run(mode: str, factor: float, request: float, key: str) -> float:
        serving = {MODES[mode]: {"step_overhead_s": 0.0, "request_overhead_s": request}}
        path = temp_profile({**scaled(base, factor), "serving": serving})
        try:
            return float(simulate(compare, mode, rate_index, path, link)[key])
        finally:
            Path(path).unlink()

    for mode in compare["modes"]:
        real = compare["modes"][mode]["runs"][rate_index]["summary"]
        factor = _bisect(lambda x, m=mode: run(m, x, 0.0, "median_tpot_ms"), real["median_tpot_ms"], 0.25, 8.0, log=True)
        request = _bisect(lambda x, m=mode, f=factor: run(m, f, x, "median_ttft_ms"), real["median_ttft_ms"], 0.0, 5.0)
        serving = {MODES[mode]: {"step_overhead_s": 0.0, "request_overhead_s": request}}
        out[mode] = {"factor": factor, "request_overhead_s": request,
                     "from_rate": compare["modes"][mode]["runs"][rate_index]["rate"],
                     "profile": temp_profile({**scaled(base, factor), "serving": serving})}
    return out


def run_load(compare: dict[str, Any], mode: str, rate_index: int) -> float:
    """The 1-minute load average over one real run (the mean of its start and end readings)."""
    la = compare["modes"][mode]["runs"][rate_index]["summary"].get("load_average") or []
    return float(np.mean(la[:1] + la[-1:])) if la else float("nan")


class LoadScaled:
    """Per (mode, rate): the calibration's slowdown times that run's load over the calibration
    run's (contention on a shared machine grows with its load), with the calibrated request
    overhead. Call `close` to remove the temporary profiles."""

    def __init__(self, compare: dict[str, Any], profile: str, slowdown: dict[str, dict[str, Any]],
                 calibration: dict[str, Any], rate_index: int = 0) -> None:
        self.base = json.loads(Path(profile).read_text())
        self.compare, self.slowdown = compare, slowdown
        self.ref = {m: run_load(calibration, m, rate_index) for m in calibration["modes"]}
        self.paths: dict[tuple[str, int], str] = {}
        self.factors: dict[str, list[float]] = {}

    def __call__(self, mode: str, rate_index: int) -> str:
        key = (mode, rate_index)
        if key not in self.paths:
            s = self.slowdown[mode]
            factor = s["factor"] * run_load(self.compare, mode, rate_index) / self.ref[mode]
            self.factors.setdefault(mode, []).append(factor)
            serving = {MODES[mode]: {"step_overhead_s": 0.0, "request_overhead_s": s["request_overhead_s"]}}
            self.paths[key] = temp_profile({**scaled(self.base, factor), "serving": serving})
        return self.paths[key]

    def close(self) -> None:
        for p in self.paths.values():
            Path(p).unlink()


def winner(goodput: dict[str, float]) -> str:
    (a, ga), (b, gb) = goodput.items()
    if max(ga, gb) <= 0 or abs(ga - gb) <= TIE * max(ga, gb):
        return "tie"
    return a if ga > gb else b


def rel(sim: float, real: float) -> float | None:
    return None if not real else sim / real - 1.0


def predict(compare: dict[str, Any], profile: Any, link: str, serving_overheads: bool = True) -> dict[str, Any]:
    """Every (mode, rate) simulated beside its measurement; per-rate winners; errors per metric."""
    modes = list(compare["modes"])
    rates = [r["rate"] for r in compare["modes"][modes[0]]["runs"]]
    rows = []
    for k, rate in enumerate(rates):
        row: dict[str, Any] = {"rate": rate, "modes": {}}
        for mode in modes:
            real = compare["modes"][mode]["runs"][k]["summary"]
            sim = simulate(compare, mode, k, profile, link, serving_overheads)
            row["modes"][mode] = {
                "real": {m: float(real.get(m, float("nan"))) for m in METRICS},
                "sim": {m: float(sim.get(m, float("nan"))) for m in METRICS},
                "error": {m: rel(float(sim.get(m, 0.0)), float(real.get(m, 0.0))) for m in METRICS},
                "sim_busy": {n: round(v["busy_frac"], 3) for n, v in sim["instances"].items()},
                "real_busy": real.get("worker_busy_fraction"),
                "sim_rejected": sim["num_rejected"], "sim_preemptions": sim["num_preemptions"],
            }
        row["winner"] = {side: winner({m: row["modes"][m][side]["request_goodput"] for m in modes})
                         for side in ("real", "sim")}
        rows.append(row)
    return {"rates": rows, "scores": scores(rows, modes), "distserve_goodput": distserve(rows, modes)}


def scores(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Winner agreement, and per mode and metric: the median and worst |error| over the rates."""
    out: dict[str, Any] = {"winner_agrees": [r["winner"]["real"] == r["winner"]["sim"] for r in rows]}
    for mode in modes:
        per: dict[str, Any] = {}
        for m in METRICS:
            errs = [abs(e) for r in rows if (e := r["modes"][mode]["error"][m]) is not None and np.isfinite(e)]
            per[m] = {"median_abs": float(np.median(errs)) if errs else None, "max_abs": max(errs, default=None),
                      "within_15pct": sum(e <= 0.15 for e in errs), "of": len(errs)}
        out[mode] = per
    return out


def distserve(rows: list[dict[str, Any]], modes: list[str], target: float = 0.9) -> dict[str, Any]:
    """DistServe's goodput: the highest swept rate whose SLO attainment is >= 90%, real and simulated."""
    out = {}
    for mode in modes:
        out[mode] = {side: max((r["rate"] for r in rows if r["modes"][mode][side]["slo_attainment"] >= target),
                               default=0.0) for side in ("real", "sim")}
    return out


def format_table(result: dict[str, Any]) -> str:
    """Rate x mode x metric: real, simulated, error; then the winners."""
    keys = ("request_goodput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_itl_ms", "p99_itl_ms", "p99_max_itl_ms")
    lines = [f"{'rate':>5} {'mode':<14} " + " ".join(f"{k.replace('_ms', ''):>22}" for k in keys)]
    for r in result["rates"]:
        for mode, m in r["modes"].items():
            cells = []
            for k in keys:
                e = m["error"][k]
                cells.append(f"{m['real'][k]:>7.2f}/{m['sim'][k]:>7.2f} {'' if e is None else f'{e:+.0%}':>6}")
            lines.append(f"{r['rate']:>5} {mode:<14} " + " ".join(f"{c:>22}" for c in cells))
        lines.append(f"{'':>5} winner (goodput): real {r['winner']['real']}, sim {r['winner']['sim']}")
    lines.append("cells: real/sim error")
    return "\n".join(lines)


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())

