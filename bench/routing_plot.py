"""One figure for the routing results: bench/results/routing.json, routing_sim.json, hedge.json.

Usage: python bench/routing_plot.py  (writes bench/results/routing.png)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

R = Path("bench/results")


def main() -> None:
    real = json.loads((R / "routing.json").read_text())
    sim = json.loads((R / "routing_sim.json").read_text())
    hedge = json.loads((R / "hedge.json").read_text())
    fig, ax = plt.subplots(1, 4, figsize=(17, 4))
    # balance: share of computed prompt tokens on the busier worker (real), busy split (sim)
    names = list(real["balance"]["sides"])
    share = [statistics.median(s["computed_token_split"][0] / sum(s["computed_token_split"])
                               for s in real["balance"]["sides"][n]) for n in names]
    ax[0].bar(names, share, color=["#c44", "#4a4"])
    ax[0].axhline(0.5, ls="--", c="gray")
    ax[0].set_ylim(0, 1)
    ax[0].set_title("balance, 2 colocated (real, CPU):\nbusier worker's share of prompt tokens")
    # prefix hit rate: real and sim, with the single-shared-cache ceiling
    rp = real["prefix"]["sides"]
    sp = sim["prefix"]["sides"]
    labels = ["least_loaded", "prefix_aware", "shared cache"]
    real_h = [statistics.median(s["hit_rate"] for s in rp["least_loaded"]),
              statistics.median(s["hit_rate"] for s in rp["prefix_aware"]), real["prefix"]["shared_cache_hit_rate"]]
    sim_h = [sp["least_loaded"]["hit_rate"], sp["prefix_aware"]["hit_rate"], sp["single_shared_cache"]["hit_rate"]]
    x = range(3)
    ax[1].bar([i - 0.2 for i in x], real_h, 0.4, label="real, 2 colocated CPU")
    ax[1].bar([i + 0.2 for i in x], sim_h, 0.4, label="sim, 8 x H100 Mooncake")
    ax[1].set_xticks(list(x), labels)
    ax[1].set_title("prefix-cache hit rate (prompt tokens)")
    ax[1].legend(fontsize=8)
    # prefix TTFT (real)
    for k, q in enumerate(("ttft_p50_s", "ttft_p99_s")):
        vals = [statistics.median(s[q] for s in rp[n]) for n in ("least_loaded", "prefix_aware")]
        ax[2].bar([k - 0.2, k + 0.2], vals, 0.4, color=["#888", "#36c"])
    ax[2].set_xticks([0, 1], ["p50", "p99"])
    ax[2].set_title("TTFT (s), real: least_loaded (grey)\nvs prefix_aware (blue)")
    hs = hedge["sides"]
    for k, q in enumerate(("ttft_p50_s", "ttft_p99_s")):
        ax[3].bar([k - 0.27, k, k + 0.27], [hs[n][q] for n in ("no_hedge", "hedge", "hedge_no_slow_worker")], 0.27,
                  color=["#888", "#c84", "#4a4"])
    ax[3].set_xticks([0, 1], ["p50", "p99"])
    ax[3].set_title("TTFT (s), 2P1D, one prefill slowed:\nno hedge / hedge / hedge, no slow worker")
    fig.tight_layout()
    fig.savefig(R / "routing.png", dpi=90)


if __name__ == "__main__":
    main()
