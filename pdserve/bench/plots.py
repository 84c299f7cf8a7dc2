"""PNG figures of a `pdserve bench compare` run: CDFs, metrics vs rate, phase breakdown, utilization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"colocated": "tab:blue", "disaggregated": "tab:orange"}
STYLES = ("-", "--", ":", "-.")
PHASES = ("router_queue", "queue", "prefill_queue", "prefill", "transfer", "decode")


def _cdf(ax: plt.Axes, xs: list[float], **kw: Any) -> None:
    xs = np.sort(np.asarray([x for x in xs if x is not None], dtype=float))
    if xs.size:
        ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, **kw)


def plot_cdfs(payload: dict[str, Any], path: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, m in payload["modes"].items():
        for i, run in enumerate(m["runs"]):
            ok = [r for r in run["requests"] if r["success"]]
            kw = {"color": COLORS[mode], "ls": STYLES[i % len(STYLES)], "label": f"{mode} @ {run['rate']:g} req/s"}
            _cdf(a1, [r["ttft_s"] * 1e3 for r in ok], **kw)
            _cdf(a2, [g * 1e3 for r in ok for g in r["itl_s"]], **kw)
    for ax, name in ((a1, "TTFT (ms)"), (a2, "inter-token latency (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if ax is a1 else "fraction of token gaps")
        ax.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.suptitle("TTFT and ITL CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_rate(payload: dict[str, Any], path: Path) -> None:
    panels = (("request_goodput", "goodput (req/s)"), ("slo_attainment", "SLO attainment"),
              ("p99_tpot_ms", "p99 TPOT (ms)"), ("p99_ttft_ms", "p99 TTFT (ms)"),
              ("p99_max_itl_ms", "p99 worst inter-token gap (ms)"))
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.6))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for mode, m in payload["modes"].items():
            rates = [r["rate"] for r in m["runs"]]
            ax.plot(rates, [r["summary"].get(key, np.nan) for r in m["runs"]], "o-", color=COLORS[mode],
                    label=mode)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    slo = payload["config"]
    axes[2].axhline(slo["slo_tpot_ms"] or np.nan, color="gray", ls=":", label="SLO")
    axes[3].axhline(slo["slo_ttft_ms"] or np.nan, color="gray", ls=":", label="SLO")
    axes[4].axhline(slo.get("slo_itl_ms") or np.nan, color="gray", ls=":", label="SLO")
    axes[0].plot(axes[0].get_xlim(), axes[0].get_xlim(), color="gray", ls=":", lw=0.8, label="offered")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_phases(payload: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    labels, bottoms = [], []
    bars = [(mode, run) for mode, m in payload["modes"].items() for run in m["runs"]]
    x = np.arange(len(bars))
    bottoms = np.zeros(len(bars))
    cmap = plt.get_cmap("tab10")
    for j, phase in enumerate(PHASES):
        vals = np.array([run["summary"]["phases_mean_ms"].get(phase, 0.0) for _, run in bars])
        if vals.any():
            ax.bar(x, vals, bottom=bottoms, color=cmap(j), label=phase)
            bottoms += vals
    labels = [f"{'colo' if mode == 'colocated' else 'disagg'}\n{run['rate']:g}/s" for mode, run in bars]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("mean ms per request")
    ax.set_title("Server-side phase breakdown (from each request's `timings`)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_util(payload: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    for mode, m in payload["modes"].items():
        workers = sorted({w for r in m["runs"] for w in r["summary"].get("worker_busy_fraction", {})})
        for i, w in enumerate(workers):
            rates = [r["rate"] for r in m["runs"]]
            busy = [r["summary"].get("worker_busy_fraction", {}).get(w, np.nan) for r in m["runs"]]
            ax.plot(rates, busy, "o" + STYLES[i % len(STYLES)], color=COLORS[mode],
                    label=f"{mode}: {w.split('@')[0]}-{i}" if mode == "colocated" else f"{mode}: {w.split('@')[0]}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("busy fraction during the run")
    ax.set_title("Worker utilization")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(payload: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, fn in (("cdf", plot_cdfs), ("vs_rate", plot_vs_rate), ("phases", plot_phases), ("util", plot_util)):
        p = out_dir / f"{stem}_{suffix}.png"
        fn(payload, p)
        paths.append(p)
    return paths
