"""Turn a run's records into the `vllm bench serve` summary, and write it as JSON with every record.

The arithmetic is `pdserve.metrics_summary` (the simulator's too); this module adds the per-phase
breakdown from the servers' `timings`, the machine description and the command line.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.client import RequestRecord, RunResult
from pdserve.metrics_summary import SLO, format_summary, summarize


def summarize_run(run: RunResult, slo: SLO | None = None) -> dict[str, Any]:
    """The summary dict for one run (failed requests count in `failed` and as SLO misses)."""
    recs = run.records
    ok = [r.success for r in recs]
    ttft = np.array([r.ttft_s * 1e3 if r.success else np.nan for r in recs])
    e2el = np.array([r.e2el_s * 1e3 if r.success else np.nan for r in recs])
    itl = np.array([g * 1e3 for r in recs if r.success for g in r.itl_s])
    prompt = np.array([r.prompt_tokens for r in recs])
    out = np.array([r.generated_tokens if s else r.output_tokens for r, s in zip(recs, ok, strict=True)])
    worst = np.array([max(r.itl_s) * 1e3 if r.success and r.itl_s else np.nan for r in recs])
    res = summarize(ttft, e2el, itl, prompt, out, run.duration_s, slo, backend="pdserve", max_itl_ms=worst)
    res["timed_by"] = sorted({r.timed_by for r in recs if r.timed_by})
    done_prompt = sum(r.prompt_tokens for r in recs if r.success)
    res["prefix_cache_hit_rate"] = sum(r.cached_tokens for r in recs if r.success) / max(1, done_prompt)
    res["phases_mean_ms"] = phase_means_ms(recs)
    res["max_send_lag_ms"] = max((r.lag_s for r in recs), default=0.0) * 1e3
    res["errors"] = sorted({r.error for r in recs if r.error})[:10]
    return res


def phase_means_ms(recs: list[RequestRecord]) -> dict[str, float]:
    """Mean milliseconds per server phase over the successful requests that report it."""
    acc: dict[str, list[float]] = {}
    for r in recs:
        if r.success:
            for k, v in r.timings.items():
                acc.setdefault(k, []).append(v * 1e3)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def format_run(res: dict[str, Any]) -> str:
    lines = format_summary(res)
    if "prefix_cache_hit_rate" in res:
        lines.append(f"prefix cache hit rate: {res['prefix_cache_hit_rate']:.1%} of prompt tokens")
    if res.get("phases_mean_ms"):
        lines.append("server phases (mean ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["phases_mean_ms"].items()))
    if res.get("max_send_lag_ms", 0) > 50:
        lines.append(f"note: the client sent a request up to {res['max_send_lag_ms']:.0f} ms late")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, Python, the repository commit."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        repo = Path(__file__).resolve().parents[2]
        info["git_commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def header(config: dict[str, Any]) -> dict[str, Any]:
    """Date, command line, machine and the run's configuration: the top of every results file."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": "pdserve " + shlex.join(sys.argv[1:]), "machine": machine_info(), "config": config}


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def run_payload(config: dict[str, Any], res: dict[str, Any], run: RunResult) -> dict[str, Any]:
    return {**header(config), "summary": res, "requests": [r.as_dict() for r in run.records]}
