"""Plot bench/results/engine_cpu.json: decode model steps against their roofline, prefill against
the matmul FLOP/s, offline throughput beside `transformers`; with `kernels` and
`offline_breakdown` in the JSON, a second figure (`<name>_breakdown.png`): where the offline time
goes, the decode-attention variants and the projections, in CPU time; with
`decode_steps_torch_attention` or `decode_steps_torch_linear` (engine_bench's `--ab`), a third
(`<name>_native.png`): the engine as configured against the same engine with torch decode
attention or with F.linear projections, alternated in the same run (decode steps and offline
runs, CPU time); with `prefill_steps_torch_prefill_ops` (`--ab prefill_ops`), `<name>_prefill_ops.png`:
prefill steps and the offline runs' prefill-step seconds, native element-wise ops against torch's.

    .venv/bin/python bench/engine_plot.py [bench/results/engine_cpu.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _step_labels(steps: list[dict]) -> list[str]:  # type: ignore[type-arg]
    """x-axis labels of decode steps: batch, context, and whether the block tables are fragmented."""
    return [f"b{d['batch']}\n{d['context']}" + ("\nfrag" if d["layout"] == "fragmented" else "") for d in steps]


def save(fig, r: dict, title: str, out: Path) -> None:  # type: ignore[no-untyped-def,type-arg]
    """The figure titled with the run's thread count and load (a shared machine), written to `out`."""
    end = f", {r['loadavg_at_end'][0]:.1f} at end" if "loadavg_at_end" in r else ""
    fig.suptitle(f"{title}, {r['machine']['torch_threads']} thread(s), load average "
                 f"{r['machine']['loadavg_1_5_15'][0]:.1f} at start{end} (shared machine)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "engine_cpu.json")
    r = json.loads(path.read_text())
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [3, 1.3, 1]})
    steps = r["decode_steps"]
    labels = _step_labels(steps)
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
    out = path.with_suffix(".png")
    save(fig, r, f"{r['model']['name']} on {r['machine']['cpu_model']}", out)
    if "kernels" in r and "offline_breakdown" in r:
        breakdown(r, path.with_name(path.stem + "_breakdown.png"))
    alt = r.get("ab", {}).get("key", "torch_attention")
    if r.get(f"decode_steps_{alt}"):
        native_vs_torch(r, alt, path.with_name(path.stem + "_native.png"))
    if r.get("prefill_steps_torch_prefill_ops"):
        prefill_ops_ab(r, path.with_name(path.stem + "_prefill_ops.png"))


def prefill_ops_ab(r: dict, out: Path) -> None:  # type: ignore[type-arg]
    """Prefill model steps (median, alternated) and the offline runs' prefill-step seconds, native
    element-wise ops against the torch ops; the matmul FLOP/s bound of each prefill step beside them."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    nat = {p["tokens"]: p for p in r["prefill_steps"]}
    tor = {p["tokens"]: p for p in r["prefill_steps_torch_prefill_ops"]}
    sizes = [n for n in nat if n in tor]
    x = range(len(sizes))
    for j, (recs, label) in enumerate(((nat, "native element-wise ops"), (tor, "torch ops"))):
        ratios = [recs[n]["s_median"] * recs[n]["matmul_flops_per_s"] / recs[n]["flops"] for n in sizes]
        bars = a.bar([i + 0.4 * j - 0.2 for i in x], ratios, 0.4, label=label)
        a.bar_label(bars, [f"{recs[n]['s_median'] * 1e3:.0f} ms" for n in sizes], fontsize=8)
    a.axhline(1.0, color="k", ls="--", label="FLOPs / matmul FLOP/s")
    a.set_xticks(list(x), [f"{n} tokens" for n in sizes])
    a.set_ylabel("median step / its matmul bound")
    a.legend(fontsize=8, loc="lower right")
    a.set_title("prefill model steps, alternated step by step")
    runs = r["offline_breakdown"]["runs"]
    keys = [k for k in ("budget", "budget_torch_prefill_ops") if k in runs]
    vals = [statistics.median(x["prefill_steps_s"] for x in runs[k]) for k in keys]
    b.bar_label(b.bar(["native", "torch ops"][: len(keys)], vals), [f"{v:.2f} s" for v in vals], fontsize=8)
    b.axhline(statistics.median(x["prefill_roofline_s"] for x in runs["budget"]), color="k", ls="--",
              label="roofline (matmul FLOP/s)")
    b.set_ylabel("s in prefill steps per offline run (median)")
    b.set_title("16-prompt offline batch")
    b.legend(fontsize=8)
    save(fig, r, f"cache.prefill_ops native vs torch, {r['model']['name']}", out)


ALT_LABELS = {"torch_attention": ("native decode attention", "torch (gather + SDPA)", "torch attn"),
              "torch_linear": ("native linear", "F.linear", "F.linear"),
              "per_op": ("fused layer", "per-op (same native kernels)", "per op")}


def native_vs_torch(r: dict, alt: str, out: Path) -> None:  # type: ignore[type-arg]
    """Decode steps and offline runs, native kernel against torch path, this thread's CPU time."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    nat, tor = r["decode_steps"], r[f"decode_steps_{alt}"]
    ours, theirs, short_alt = ALT_LABELS[alt]
    rows = r.get("decode_linear", {}).get("native_rows")
    if alt == "torch_linear" and rows:  # steps outside these rows run F.linear on both sides
        ours += f" ({rows[0]}-{rows[1]} rows; other steps F.linear)"
    labels = _step_labels(nat)
    x = range(len(nat))
    a.bar([i - 0.27 for i in x], [d["step_cpu_s_median"] * 1e3 for d in nat], 0.27, label=ours)
    a.bar(list(x), [d["step_cpu_s_median"] * 1e3 for d in tor], 0.27, label=theirs)
    a.bar([i + 0.27 for i in x], [d["roofline_s"] * 1e3 for d in nat], 0.27, label="roofline (this run)")
    a.set_xticks(list(x), labels, fontsize=8)
    a.set_ylabel("CPU ms per decode step (median)")
    a.set_yscale("log")
    a.legend()
    a.set_title("decode steps, alternated step by step")
    cpu = r["throughput"].get("cpu_seconds", {})
    names = [k for k in ("pdserve", f"pdserve_{alt}", "transformers") if cpu.get(k)]
    short = {"pdserve": "pdserve\nnative", f"pdserve_{alt}": f"pdserve\n{short_alt}", "transformers": "transformers"}
    b.bar([short[n] for n in names], [statistics.median(cpu[n]) for n in names])
    b.set_ylabel("CPU s per offline run (median)")
    b.set_title("16-prompt offline batch")
    save(fig, r, f"{ours} vs {theirs}, {r['model']['name']}", out)


def breakdown(r: dict, out: Path) -> None:  # type: ignore[type-arg]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.2, 2, 1]})
    runs = r["offline_breakdown"]["runs"]
    parts = ("prefill_steps_s", "decode_steps_s", "outside_steps_s")
    names = [f"{k}\n({runs[k][0]['max_num_batched_tokens']} tok/step)" for k in runs]
    bottom = [0.0] * len(runs)
    for part in parts:
        vals = [statistics.median(x[part] for x in v) for v in runs.values()]
        a.bar(names, vals, bottom=bottom, label=part.removesuffix("_s").replace("_", " "))
        bottom = [p + q for p, q in zip(bottom, vals, strict=True)]
    hf = r["throughput"]["seconds"].get("transformers")
    if hf:
        a.axhline(statistics.median(hf), color="k", ls="--", label="transformers (median)")
    a.set_ylabel("s (median of the alternated runs)")
    a.set_title("offline batch: where pdserve's time goes")
    a.legend(fontsize=8)
    att = r["kernels"]["decode_attention"]
    b.bar(list(att["cpu_ms_per_step"]), list(att["cpu_ms_per_step"].values()))
    b.set_xticks(range(len(att["cpu_ms_per_step"])), [k.replace("_", "\n", 1) for k in att["cpu_ms_per_step"]],
                 fontsize=8)
    b.set_ylabel("CPU ms per step (all layers)")
    b.set_title(f"decode attention, batch {att['batch']}, {att['context']} ctx, fragmented")
    proj = r["kernels"]["projections"]
    if "linear_kernel" in r["kernels"]:  # F.linear against the native kernel at 1..32 rows
        lk = r["kernels"]["linear_kernel"]["batches"]
        rows = list(lk)
        for j, kind in enumerate(("linear", "native")):
            c.bar([i + 0.4 * j for i in range(len(rows))], [lk[m]["cpu_ms_per_step"][kind] for m in rows], 0.4,
                  label={"linear": "F.linear", "native": "native kernel"}[kind])
        c.set_xticks([i + 0.2 for i in range(len(rows))], rows)
        c.set_xlabel("rows (decode batch)")
    else:
        kinds = list(proj[0]["cpu_ms_per_step"])
        for j, kind in enumerate(kinds):
            c.bar([i + 0.4 * j for i in range(len(proj))], [p["cpu_ms_per_step"][kind] for p in proj], 0.4,
                  label=kind)
        c.set_xticks([i + 0.2 for i in range(len(proj))], [f"batch {p['batch']}" for p in proj])
    c.axhline(proj[0]["weights_read_ms_at_copy_bw"], color="k", ls="--", label="weights / copy bandwidth")
    c.set_ylabel("CPU ms per step")
    c.set_title("projections")
    c.legend(fontsize=8)
    save(fig, r, f"{r['model']['name']}", out)


if __name__ == "__main__":
    main()
