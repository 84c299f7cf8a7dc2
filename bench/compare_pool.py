"""Pool `pdserve bench compare` runs of one workload and SLO: attainment per rate over every run's
requests, with 95% Wilson intervals, and DistServe's goodput of each mode from the pooled points.

    .venv/bin/python bench/compare_pool.py --name NAME RUN1.json RUN2.json ...

Writes bench/results/NAME.json and NAME.png (attainment vs rate, both modes, interval bars).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdserve.bench.plots import COLORS  # noqa: E402
from pdserve.bench.pooled import goodput, pool, same_slo  # noqa: E402
from pdserve.bench.report import header, write_json  # noqa: E402


def plot(pooled: dict, path: Path, target: float) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode, rows in pooled.items():
        xs = [r["rate"] for r in rows]
        ys = [r["attainment"] for r in rows]
        err = [[max(0.0, y - r["interval95"][0]) for y, r in zip(ys, rows, strict=True)],
               [max(0.0, r["interval95"][1] - y) for y, r in zip(ys, rows, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=COLORS.get(mode), label=mode)
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("SLO attainment (pooled)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    payloads = [json.loads(p.read_text()) for p in args.runs]
    pooled = pool(payloads)
    good = {m: goodput(rows, args.target) for m, rows in pooled.items()}
    out = {**header(same_slo(payloads)), "inputs": [str(p.relative_to(REPO)) if p.is_absolute() else str(p)
                                                    for p in args.runs],
           "target": args.target, "pooled": pooled, "goodput": good}
    write_json(args.out_dir / f"{args.name}.json", out)
    plot(pooled, args.out_dir / f"{args.name}.png", args.target)
    for mode, rows in pooled.items():
        pts = ", ".join(f"{r['rate']:g}: {r['attainment']:.3f} [{r['interval95'][0]:.2f}-{r['interval95'][1]:.2f}]"
                        f" n={r['requests']}" for r in rows)
        print(f"{mode:>14}  {pts}")
        print(f"{'':>14}  goodput: highest {good[mode]['highest']:g}, before first miss "
              f"{good[mode]['before_first_miss']:g} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
