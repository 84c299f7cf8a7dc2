"""Plot `engine_bench.py --steps-only --ab layer` runs: each decode model step with the fused layer
(one native call per decoder layer) beside the per-op path (the same native kernels, op by op),
alternated step by step in one run, and the step's roofline; one panel per JSON (e.g. 1 and 2
threads). Median wall time per step.

    .venv/bin/python bench/decode_layer_plot.py OUT.png RUN.json [RUN.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, runs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 4 * len(runs)), squeeze=False)
    for ax, path in zip(axes[:, 0], runs, strict=True):
        r = json.loads(path.read_text())
        fused, per_op = r["decode_steps"], r["decode_steps_per_op"]
        x = range(len(fused))
        labels = [f"b{d['batch']}\n{d['context']}" + ("\nfrag" if d["layout"] == "fragmented" else "") for d in fused]
        ax.bar([i - 0.27 for i in x], [d["step_s_median"] * 1e3 for d in fused], 0.27, label="fused layer")
        ax.bar(list(x), [d["step_s_median"] * 1e3 for d in per_op], 0.27, label="per-op path")
        ax.bar([i + 0.27 for i in x], [d["roofline_s"] * 1e3 for d in fused], 0.27, label="roofline", color="grey")
        for i, (f, p) in enumerate(zip(fused, per_op, strict=True)):
            ax.text(i - 0.27, f["step_s_median"] * 1e3, f"{f['step_s_median'] / p['step_s_median']:.2f}x",
                    ha="center", va="bottom", fontsize=7)
        m = r["machine"]
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title(f"{path.name}: {m['torch_threads']} threads, copy {r['copy_bandwidth']['gbps_read_plus_write']:.1f}"
                     f" GB/s, load {m['loadavg_1_5_15'][0]:.1f} at start (label: fused / per-op)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
