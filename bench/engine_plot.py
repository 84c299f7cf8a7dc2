"""Plot bench/results/engine_cpu.json: decode model steps against their roofline, prefill against
the matmul FLOP/s, offline throughput beside `transformers`.

    .venv/bin/python bench/engine_plot.py [bench/results/engine_cpu.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "engine_cpu.json")
    r = json.loads(path.read_text())
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [3, 1.3, 1]})
    steps = r["decode_steps"]
    labels = [f"b{d['batch']}\n{d['context']}" + ("\nfrag" if d["layout"] == "fragmented" else "") for d in steps]
    x = range(len(steps))
    a.bar([i - 0.2 for i in x], [d["step_s_median"] * 1e3 for d in steps], 0.4, label="pdserve step (median)")
    a.bar([i + 0.2 for i in x], [d["roofline_s"] * 1e3 for d in steps], 0.4, label="roofline")
    a.set_xticks(list(x), labels, fontsize=8)
    a.set_ylabel("ms per decode step")
    a.set_yscale("log")
    a.legend()
    a.set_title("decode: batch / context")
    pre = r["prefill_steps"]
    b.bar([str(p["tokens"]) for p in pre], [p["fraction_of_matmul"] * 100 for p in pre])
    b.set_ylabel("% of measured matmul FLOP/s")
    b.set_title("fresh prefill, tokens")
    t = r["throughput"]
    c.bar(["pdserve", "transformers"], [t["pdserve_tok_per_s_median"], t.get("transformers_tok_per_s_median", 0)])
    c.set_ylabel("output tok/s (median)")
    c.set_title("16-prompt offline batch")
    load = r["machine"]["loadavg_1_5_15"][0]
    fig.suptitle(f"{r['model']['name']} on {r['machine']['cpu_model']}, {r['machine']['torch_threads']} thread(s), "
                 f"load average {load:.1f} at start (shared machine)")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
