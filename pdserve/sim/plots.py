"""PNG plots for `pdserve sim --plot` and `pdserve plan --sweep-rate --plot` (matplotlib, Agg)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pdserve.sim.cluster import SimResult
from pdserve.sim.metrics import per_request_ms


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sim(r: SimResult, path: str, title: str) -> None:
    """TTFT and TPOT distributions, and instance busy fractions."""
    plt = _plt()
    m = per_request_ms(r)
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for a, key in zip(ax[:2], ("ttft", "tpot"), strict=True):
        xs = np.sort(m[key][~np.isnan(m[key])])
        a.plot(xs, np.linspace(0, 1, len(xs)))
        a.set_xlabel(f"{key.upper()} (ms)")
        a.set_ylabel("CDF")
        a.grid(alpha=0.3)
    names = list(r.instances)
    ax[2].bar(range(len(names)), [r.instances[n]["busy_frac"] for n in names])
    ax[2].set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax[2].set_ylabel("busy fraction (1.0 = hardware never idle)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Hourly cost of the cheapest SLO-meeting cluster vs request rate, both modes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("disagg", "disaggregated"), ("colocated", "colocated")):
        pts = [(r["rate"], r[key]["cost"]) for r in rows if r[key]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("cheapest cluster meeting SLOs (USD/hour)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
