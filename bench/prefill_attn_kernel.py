"""Prefill attention alone: the native kernel (`pdserve/model/prefill_attention.c`) against the SDPA path.

Both sides are `paged_attention` as a prefill step calls it, on the demo model's heads (8 query
heads, 4 KV heads, head_dim 64, 16-token blocks), over one cache per layer (8 layers: the step's
K/V do not all sit in L2), a sequence's blocks consecutive as the engine hands them out:
* native: `cache.prefill_attention = native`, one kernel call per layer for the step's chunks;
* sdpa: the torch path: a fresh chunk by SDPA's causal fast path on its own K/V, a continuing
  chunk's context gathered out of the blocks (index_select into the step's buffer) and attended
  with the boolean mask built in step_metadata.
Cases: fresh chunks of 512 and 2048 tokens, and a continuing chunk (512 new tokens after 1536 of
context). Alternated round by round; the medians (and each round's) of wall and this thread's CPU
time (on a loaded machine the CPU time leaves out the waits for a core). GFLOP/s counts the causal
work only (4 x heads x head_dim x the keys each query sees), beside the best fp32 matmul FLOP/s
measured in the same run (2048^3, MKL). Greedy engine runs check the numerics; this checks the two
paths agree within the attention tests' tolerance.

    PYTHONPATH=. python bench/prefill_attn_kernel.py --threads 1 --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench  # noqa: E402

from pdserve.engine.model_runner import step_metadata  # noqa: E402
from pdserve.model import prefill_attention  # noqa: E402
from pdserve.model.attention import paged_attention  # noqa: E402

CASES = {"fresh_512": (0, 512), "fresh_2048": (0, 2048), "continuing_512_after_1536": (1536, 512)}


def causal_flops(start: int, n: int, heads: int, dim: int) -> float:
    """Q.K^T and P.V over the keys each query sees (query at position p: p + 1 keys)."""
    keys = sum(p + 1 for p in range(start, start + n))
    return 4.0 * heads * dim * keys


def case(name: str, start: int, n: int, layers: int, kv: int, group: int, dim: int, bs: int, reps: int,
         rounds: int) -> dict[str, Any]:
    heads, ctx = kv * group, start + n
    nb = -(-ctx // bs)
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, nb + 1, bs, kv, dim, generator=gen) for _ in range(layers)]
    # q a strided view of a fused qkv buffer, as the model hands it over
    qkv = torch.randn(n, heads + 2 * kv, dim, generator=gen)
    q, k, v = qkv.split([heads, kv, kv], dim=1)
    spans = [(list(range(1, nb + 1)), start, n)]
    workspace: list[torch.Tensor] = []
    metas = {"native": step_metadata(spans, bs, torch.device("cpu"), workspace, native_prefill=True),
             "sdpa": step_metadata(spans, bs, torch.device("cpu"), workspace, native_prefill=False)}
    for c in caches:  # the chunk's own K/V where the step wrote them (the fresh SDPA path reads k, v)
        c.view(2, -1, kv, dim)[0, metas["native"].slot_mapping] = k
        c.view(2, -1, kv, dim)[1, metas["native"].slot_mapping] = v
    outs: dict[str, torch.Tensor] = {}

    def call(side: str) -> None:
        for c in caches:
            outs[side] = paged_attention(q, k, v, c, metas[side], dim**-0.5)

    wall: dict[str, list[float]] = {s: [] for s in metas}
    cpu: dict[str, list[float]] = {s: [] for s in metas}
    for _ in range(rounds):
        for side in metas:
            call(side)  # warm: buffers, the gather workspace
            ts, cs = [], []
            for _ in range(reps):
                t, c0 = time.perf_counter(), time.thread_time()
                call(side)
                ts.append(time.perf_counter() - t)
                cs.append(time.thread_time() - c0)
            wall[side].append(statistics.median(ts) / layers * 1e3)
            cpu[side].append(statistics.median(cs) / layers * 1e3)
    flops = causal_flops(start, n, heads, dim)
    rec: dict[str, Any] = {"case": name, "start": start, "tokens": n, "context": ctx, "flops_per_layer": flops,
                           "ms_per_layer_rounds": wall, "cpu_ms_per_layer_rounds": cpu,
                           "ms_per_layer": {s: statistics.median(v) for s, v in wall.items()},
                           "cpu_ms_per_layer": {s: statistics.median(v) for s, v in cpu.items()}}
    rec["gflops"] = {s: flops / (v * 1e-3) / 1e9 for s, v in rec["ms_per_layer"].items()}
    rec["cpu_gflops"] = {s: flops / (v * 1e-3) / 1e9 for s, v in rec["cpu_ms_per_layer"].items()}
    rec["native_speedup"] = rec["ms_per_layer"]["sdpa"] / rec["ms_per_layer"]["native"]
    rec["native_speedup_cpu"] = rec["cpu_ms_per_layer"]["sdpa"] / rec["cpu_ms_per_layer"]["native"]
    rec["max_abs_diff"] = (outs["native"] - outs["sdpa"]).abs().max().item()
    return rec


def plot(res: dict[str, Any], path: Path) -> None:
    """GFLOP/s (CPU time) of each side per case, the machine's matmul rate as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = res["cases"]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, side in enumerate(("sdpa", "native")):
        ax.bar([i + 0.4 * j for i in range(len(cases))], [c["cpu_gflops"][side] for c in cases], 0.4, label=side)
    mm = res["matmul"]["flops_per_s"] / 1e9
    ax.axhline(mm, color="k", lw=0.8, ls="--", label=f"fp32 matmul {mm:.0f}")
    ax.set_xticks([i + 0.2 for i in range(len(cases))],
                  [f"{c['case']}\n{c['native_speedup_cpu']:.2f}x" for c in cases], fontsize=8)
    ax.set_ylabel("GFLOP/s (causal work, CPU time)")
    ax.set_title(f"{path.stem}: {res['threads']} thread, load {res['load_avg_before'][0]:.1f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = prefill_attention.library()
    if isinstance(lib, str):
        raise SystemExit(lib)
    kv, group, dim, bs = 4, 2, 64, 16  # the demo model's heads; CacheConfig's block size
    mm = engine_bench.matmul_flops("cpu")
    res: dict[str, Any] = {"command": " ".join(["PYTHONPATH=. python", *sys.argv]),
                           "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                           "threads": args.threads, "load_avg_before": os.getloadavg(),
                           "vector_path": prefill_attention.vectorised(dim, group),
                           "shape": {"layers": args.layers, "kv_heads": kv, "group": group, "head_dim": dim,
                                     "block_size": bs}, "matmul": mm, "cases": []}
    for name in args.cases.split(","):
        start, n = CASES[name]
        r = case(name, start, n, args.layers, kv, group, dim, bs, args.reps, args.rounds)
        r["loadavg_1"] = os.getloadavg()[0]
        res["cases"].append(r)
        print(json.dumps({k: r[k] for k in ("case", "ms_per_layer", "cpu_gflops", "native_speedup_cpu",
                                            "max_abs_diff", "loadavg_1")}), flush=True)
    res["matmul_after"] = engine_bench.matmul_flops("cpu")
    res["load_avg_after"] = os.getloadavg()
    print(f"matmul {mm['flops_per_s'] / 1e9:.1f} GFLOP/s before, {res['matmul_after']['flops_per_s'] / 1e9:.1f} after")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        plot(res, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
