"""Plot a transfer_bench JSON: per case, each receive path's ratio to its reference (tcp: raw
loopback, shm: memcpy) by wall clock and by CPU, beside the CPU ceiling of the passes it must make
and the target.

    .venv/bin/python bench/transfer_plot.py bench/results/transfer_loaded_r4.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    src = Path(sys.argv[1])
    data = json.loads(src.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, kind in zip(axes, ("tcp", "shm"), strict=True):
        cases = [c for c in data["cases"] if c["transport"] == kind and c["secret"]]
        labels = sorted({(c["model"], c["tokens"]) for c in cases}, key=lambda k: (k[0], k[1]))
        width = 0.2
        for j, path in enumerate(("direct", "buffered")):
            rows = {(c["model"], c["tokens"]): c for c in cases if c["path"] == path}
            if not rows:
                continue
            wall = [rows[k]["vs_loopback" if kind == "tcp" else "vs_memcpy"] for k in labels]
            ax.bar([i + (2 * j - 1) * width for i in range(len(labels))], wall, width,
                   label=f"{path}: wall clock", color="C0" if path == "direct" else "C1")
            ceiling = [rows[k]["bound"]["ceiling_vs_reference"] for k in labels]
            ax.scatter([i + (2 * j - 1) * width for i in range(len(labels))], ceiling, marker="_", s=400,
                       color="k", zorder=3, label="CPU ceiling of the passes" if j == 0 else None)
            if kind == "tcp":
                cpu = [rows[k]["cpu_vs_loopback"] for k in labels]
                ax.bar([i + 2 * j * width for i in range(len(labels))], cpu, width, alpha=0.5,
                       label=f"{path}: by CPU", color="C0" if path == "direct" else "C1", hatch="//")
        target = data["targets"]["tcp_vs_loopback" if kind == "tcp" else "shm_vs_memcpy"]
        ax.axhline(target, color="r", ls="--", label=f"target {target}x")
        ax.set_xticks(range(len(labels)), [f"{m}\n{t} tok" for m, t in labels])
        ax.set_title(f"{kind}: x {'raw loopback' if kind == 'tcp' else 'memcpy'} (secret on)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ratio to reference")
    load = data.get("load_average_start", [0])[0]
    fig.suptitle(f"KV transfer, keyed BLAKE3 on ({src.name}, load average {load:.1f})")
    fig.tight_layout()
    out = src.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
