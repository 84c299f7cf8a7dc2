"""bench/disagg_ttft.py's results: each request's TTFT by phase, the per-mode and per-length summary
of the paired requests, the stacked-bar PNG, and the table it prints."""

from __future__ import annotations

import statistics
from pathlib import Path

PHASES = ("router_queue", "router_reserve", "queue", "prefill", "hops", "engine_cpu_s", "transfer", "decode")


def phases(rec: dict) -> dict[str, float | None]:
    """One request's TTFT broken down (see the module docstring); colocated `queue` and prefill
    `prefill_queue` both count as `queue`."""
    t = rec["timings"] or {}
    out: dict[str, float | None] = {k: t.get(k) for k in ("router_queue", "router_reserve", "prefill",
                                                          "transfer", "decode")}
    out["queue"] = t.get("queue", t.get("prefill_queue"))
    parts = [out["router_queue"], out["queue"], out["prefill"]]
    out["hops"] = rec["ttft_s"] - sum(parts) if None not in parts and rec["ttft_s"] is not None else None
    out["engine_cpu_s"] = rec.get("engine_cpu_s")
    return out


def med(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def summarize(records: list[dict], modes: list[str], lengths: list[int]) -> list[dict]:
    meas = [r for r in records if not r["warmup"] and not r["error"]]
    rows = []
    for name in modes:
        for L in lengths:
            c = [r for r in meas if r["paired_with"] == name and r["tokens"] == L and r["mode"] == "colocated"]
            d = [r for r in meas if r["paired_with"] == name and r["tokens"] == L and r["mode"] == name]
            by_i = {r["i"]: r for r in c}
            pairs = [(by_i[r["i"]], r) for r in d if r["i"] in by_i]
            rows.append({
                "mode": name, "tokens": L, "n": len(pairs),
                "colocated_ttft_median_s": med([r["ttft_s"] for r in c]),
                "disagg_ttft_median_s": med([r["ttft_s"] for r in d]),
                "added_ttft_median_s": med([b["ttft_s"] - a["ttft_s"] for a, b in pairs]),
                "ratio_median": med([b["ttft_s"] / a["ttft_s"] for a, b in pairs]),
                "cpu_ratio_median": med([b["engine_cpu_s"] / a["engine_cpu_s"] for a, b in pairs
                                         if a.get("engine_cpu_s") and b.get("engine_cpu_s")]),
                "same_tokens": all(a["token_ids"] == b["token_ids"] for a, b in pairs),
                "colocated_phases_median_s": {k: med([phases(r)[k] for r in c]) for k in PHASES},
                "disagg_phases_median_s": {k: med([phases(r)[k] for r in d]) for k in PHASES},
            })
    return rows


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = [("router_queue", "router (incl. reserve)"), ("queue", "worker queue"), ("prefill", "prefill compute"),
             ("hops", "hops (HTTP, frames, SSE)")]
    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 4), squeeze=False)
    for ax, row in zip(axes[0], summary, strict=True):
        for x, side in enumerate(("colocated", "disagg")):
            ph = row[f"{side}_phases_median_s"]
            bottom = 0.0
            for i, (k, label) in enumerate(stack):
                v = max(0.0, ph.get(k) or 0.0)
                ax.bar(x, v, bottom=bottom, color=f"C{i}", label=label if x == 0 else None)
                bottom += v
            ax.text(x, bottom, f"{row[f'{side}_ttft_median_s']:.2f}s", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["colocated", row["mode"]])
        ax.set_title(f"{row['tokens']} tokens: {row['ratio_median']:.2f}x", fontsize=9)
        ax.set_ylabel("median TTFT (s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(stack))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(summary: list[dict], errors: int, wall_s: float, path: Path) -> None:
    """The summary as the table the bench prints at the end."""
    hdr = (f"{'mode':<13} {'tok':>5} {'colo ms':>8} {'dis ms':>8} {'+ms':>7} {'ratio':>6} {'cpu x':>6} "
           f"{'reserve':>7} {'rq c/d':>11} {'q c/d':>9} {'pf c/d':>15} {'hops c/d':>11}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in summary:
        c, d = r["colocated_phases_median_s"], r["disagg_phases_median_s"]
        print(f"{r['mode']:<13} {r['tokens']:>5} {ms(r['colocated_ttft_median_s']):>8} {ms(r['disagg_ttft_median_s']):>8} "
              f"{ms(r['added_ttft_median_s']):>7} {(r['ratio_median'] or float('nan')):>6.2f} "
              f"{(r['cpu_ratio_median'] or float('nan')):>6.2f} {ms(d['router_reserve']):>7} "
              f"{ms(c['router_queue']) + '/' + ms(d['router_queue']):>11} {ms(c['queue']) + '/' + ms(d['queue']):>9} "
              f"{ms(c['prefill']) + '/' + ms(d['prefill']):>15} {ms(c['hops']) + '/' + ms(d['hops']):>11}"
              + ("" if r["same_tokens"] else "  TOKENS DIFFER"))
    print(f"\n(medians, ms; +ms / ratio / cpu x: median of paired diffs / ratios vs the colocated requests "
          f"interleaved with that mode; errors={errors}; wall {wall_s:.0f}s; wrote {path})")
