"""The CPU paged decode-attention kernel (`pdserve/model/paged_decode.c`) alone, against its KV bound.

Times `paged_decode_f32` over one cache per layer (the demo model's 8 layers, so the step's K/V do
not sit in cache), laid out as the engine bench lays it out (each sequence's first 256 tokens in
consecutive blocks, the rest one block at a time round-robin), at several batch sizes and
contexts. Effective GB/s = K/V bytes read per second, beside the copy bandwidth measured in the
same run (GB/s read + write, as engine_bench). `--baseline FILE` times a second build of the
kernel (e.g. `git show HEAD:pdserve/model/paged_decode.c > /tmp/old.c`) interleaved, and checks
the two agree within the attention tests' tolerance. Wall and this thread's CPU time (on a loaded
machine the CPU time leaves out the waits for a core; memory stalls stay in it).

    PYTHONPATH=. python bench/attn_kernel.py --threads 1 --baseline /tmp/old.c --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import ctypes
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
import engine_kernels  # noqa: E402

from pdserve.model import native_build, native_decode  # noqa: E402


def load(source: Path) -> ctypes.CDLL:
    """The kernel built from `source` with the engine's flags."""
    includes = (native_decode.FTZ_HEADER,) if source == native_decode.SOURCE else ()
    lib = native_build.build(source, native_decode.COMPILE_FLAGS, native_decode.LINK_FLAGS, includes=includes)
    if isinstance(lib, str):
        raise RuntimeError(lib)
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.paged_decode_f32.argtypes = [p, i64, p, i64, p, i64, i32, i32, i32, i32, p, p, p, i32, i32, f32, i32, i32]
    lib.paged_decode_f32.restype = None
    return lib


def case(libs: dict[str, ctypes.CDLL], batch: int, ctx: int, layers: int, kv: int, group: int, dim: int,
         bs: int, threads: int, reps: int, rounds: int) -> dict[str, Any]:
    tables, nb = engine_kernels.bench_tables(batch, ctx, bs)
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, nb, bs, kv, dim, generator=gen) for _ in range(layers)]
    q = torch.randn(batch, kv * group, dim, generator=gen)
    rows = torch.arange(batch, dtype=torch.int64)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    tab = torch.tensor(tables, dtype=torch.int32).contiguous()
    split = kv if batch < threads else 1
    outs = {k: torch.empty(batch, kv * group, dim) for k in libs}

    def call(name: str) -> None:
        o, lib = outs[name], libs[name]
        for c in caches:
            lib.paged_decode_f32(q.data_ptr(), q.stride(0), o.data_ptr(), o.stride(0), c.data_ptr(), nb, bs, kv, dim,
                                 group, rows.data_ptr(), lens.data_ptr(), tab.data_ptr(), tab.shape[1], batch,
                                 dim**-0.5, split, threads)

    wall: dict[str, list[float]] = {k: [] for k in libs}
    cpu: dict[str, list[float]] = {k: [] for k in libs}  # this thread's CPU time: leaves out waits for a core
    for _ in range(rounds):
        for name in libs:
            call(name)
            ts, cs = [], []
            for _ in range(reps):
                t, c = time.perf_counter(), time.thread_time()
                call(name)
                ts.append(time.perf_counter() - t)
                cs.append(time.thread_time() - c)
            wall[name].append(statistics.median(ts) * 1e3)
            cpu[name].append(statistics.median(cs) * 1e3)
    kv_bytes = layers * batch * ctx * kv * dim * 4 * 2
    rec: dict[str, Any] = {"batch": batch, "ctx": ctx, "kv_bytes_per_step": kv_bytes,
                           "ms_per_step_rounds": wall, "cpu_ms_per_step_rounds": cpu,
                           "ms_per_step": {k: statistics.median(v) for k, v in wall.items()},
                           "cpu_ms_per_step": {k: statistics.median(v) for k, v in cpu.items()}}
    rec["effective_gbps"] = {k: kv_bytes / (v * 1e-3) / 1e9 for k, v in rec["ms_per_step"].items()}
    if "baseline" in outs:
        rec["max_abs_diff_vs_baseline"] = (outs["native"] - outs["baseline"]).abs().max().item()
    return rec


def plot(res: dict[str, Any], path: Path) -> None:
    """Each case's CPU ms per step over its KV bound, per build (1.0: at the copy bandwidth)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = res["cases"]
    names = list(cases[0]["cpu_ms_per_step"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for n, name in enumerate(names):
        ax.bar([i + 0.4 * n for i in range(len(cases))], [c["cpu_ms_per_step"][name] / c["bound_ms"] for c in cases],
               0.4, label=name)
    ax.set_xticks([i + 0.2 for i in range(len(cases))], [f"b{c['batch']}\nctx {c['ctx']}" for c in cases])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("CPU ms / KV bound")
    ax.set_title(f"{path.stem}: {res['threads']} thread(s), copy {res['copy_bandwidth']['gbps_read_plus_write']:.1f} GB/s,"
                 f" load {res['load_avg_before'][0]:.1f}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,8,16,32")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another paged_decode.c, timed interleaved as 'baseline'")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    libs = {"native": load(native_decode.SOURCE)}
    if args.baseline:
        libs["baseline"] = load(args.baseline)
    kv, group, dim, bs = 4, 2, 64, 16  # the demo model's heads; CacheConfig's block size
    bw = engine_bench.copy_bandwidth("cpu", 256 << 20)
    res: dict[str, Any] = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "threads": args.threads, "load_avg_before": os.getloadavg(),
                           "shape": {"layers": args.layers, "kv_heads": kv, "group": group, "head_dim": dim,
                                     "block_size": bs}, "copy_bandwidth": bw, "cases": []}
    for ctx in map(int, args.contexts.split(",")):
        for b in map(int, args.batches.split(",")):
            r = case(libs, b, ctx, args.layers, kv, group, dim, bs, args.threads, args.reps, args.rounds)
            r["bound_ms"] = r["kv_bytes_per_step"] / (bw["gbps_read_plus_write"] * 1e9) * 1e3
            res["cases"].append(r)
            print(json.dumps({k: r[k] for k in ("batch", "ctx", "ms_per_step", "cpu_ms_per_step", "effective_gbps",
                                                "bound_ms")}
                             | {"diff": r.get("max_abs_diff_vs_baseline")}), flush=True)
    res["load_avg_after"] = os.getloadavg()
    print(f"copy {bw['gbps_read_plus_write']:.1f} GB/s")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        plot(res, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
