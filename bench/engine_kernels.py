"""What the batched decode step's kernels cost on their own, for `engine_bench.py`.

Two questions the per-op profile of the batch-16 step raises, answered with the model's own shapes:

* Decode attention over a fragmented paged cache: is copying each sequence's blocks into one
  buffer (today's path) slower than reading them in place? Variants, all giving the same output:
  `gather_one_sdpa` (today: one `index_select` of every block, one SDPA call with a mask),
  `gather_per_seq` (a small per-sequence buffer that stays in L2), `runs_lse` (SDPA per
  contiguous run of blocks, read in place, merged by log-sum-exp), `prefix_lse` (the contiguous
  prefix in place, only the fragmented tail gathered, merged by log-sum-exp), `gather_only` (the
  copy alone), `in_place_contiguous` (SDPA alone on a contiguous layout: the floor the copy
  sits on top of) and `native_in_place` (pdserve/model/paged_decode.c: every block read once in
  place, no copy; what the engine runs for float32 on a CPU). Times are per step (all layers),
  wall and this thread's CPU time.
* The projections at the decode batch size: `torch.nn.functional.linear` against MKL's prepacked
  GEMM (`torch.ops.mkl._mkl_linear`, weights packed once for one batch size), whether the two
  are bitwise equal, and the weights' read time at the measured copy bandwidth.
* The same projections by pdserve's small-batch kernel (`pdserve/model/small_linear.c`, W read
  in place) against `F.linear`, at 1 to 32 rows (`linear_kernel`; standalone: `python
  bench/engine_kernels.py --threads 1 2 --out ...`), optionally against a second build of the
  kernel from another source (`--baseline FILE`, e.g. the previous commit's small_linear.c), all
  interleaved; each with GFLOP/s and effective GB/s (weights read per second) beside the roofline
  max(weight bytes / copy bandwidth, FLOPs / matmul FLOP/s), both measured in the same run.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pdserve.config.model import ModelShape
from pdserve.model import native_build, native_decode, small_linear


def _median_ms(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and thread-CPU milliseconds of `fn` (CPU time leaves out waits for a core)."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def _interleaved(fns: dict[str, Callable[[], object]], reps: int, rounds: int) -> dict[str, Any]:
    """Each of `fns` timed in turn, `rounds` times; medians of the rounds' medians."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            w, c = _median_ms(fn, reps)
            wall[name].append(w)
            cpu[name].append(c)
    return {"ms_per_step": {k: statistics.median(v) for k, v in wall.items()},
            "cpu_ms_per_step": {k: statistics.median(v) for k, v in cpu.items()},
            "ms_per_step_rounds": wall, "cpu_ms_per_step_rounds": cpu}


def _runs(table: list[int]) -> list[tuple[int, int]]:
    """(first block, length) of each run of consecutive block ids."""
    out, s = [], 0
    for k in range(1, len(table) + 1):
        if k == len(table) or table[k] != table[k - 1] + 1:
            out.append((table[s], k - s))
            s = k
    return out


def bench_tables(batch: int, ctx: int, bs: int, prefix: int = 256) -> tuple[list[list[int]], int]:
    """Block tables as `engine_bench._requests(..., prompt=prefix)` lays them out (each sequence's
    first `prefix` tokens in consecutive blocks, the rest one block at a time round-robin across
    the sequences), and the number of blocks they use."""
    need = -(-ctx // bs)
    first = min(prefix // bs, need)
    tables = [[i * first + j for j in range(first)] for i in range(batch)]
    nxt = batch * first
    for _ in range(first, need):
        for t in tables:
            t.append(nxt)
            nxt += 1
    return tables, nxt


def decode_attention_variants(shape: ModelShape, batch: int, ctx: int, block_size: int = 16,
                              prefix: int = 256, reps: int = 7, rounds: int = 3) -> dict[str, Any]:
    """Per-step ms of each variant (median of `rounds` interleaved medians) on a cache laid out as
    `engine_bench._requests(..., prompt=prefix)` lays it out: each sequence's first `prefix` tokens
    in consecutive blocks, the rest one block at a time round-robin across the sequences."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kv, d, bs = shape.num_kv_heads, shape.head_dim, block_size
    g = shape.num_heads // kv
    tables, nxt = bench_tables(batch, ctx, bs, prefix)
    need, first, nb = len(tables[0]), min(prefix // bs, len(tables[0])), nxt + 1
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, nb, bs, kv, d, generator=gen) for _ in range(shape.num_layers)]
    contiguous = [torch.randn(2, batch * need, bs, kv, d, generator=gen) for _ in range(shape.num_layers)]
    q = torch.randn(batch, kv, g, d, generator=gen)
    scale = d**-0.5
    row = bs * kv * d
    every = torch.tensor([b for t in tables for b in t])
    every2 = torch.cat([every, every + nb])
    ws = torch.empty(2 * batch * need, row)
    mask = (torch.arange(need * bs)[None, :] < ctx)[:, None, None, :].expand(batch, 1, 1, need * bs)
    per_seq = [torch.cat([torch.tensor(t), torch.tensor(t) + nb]) for t in tables]
    ws1 = torch.empty(2 * need, row)
    runs = [_runs(t) for t in tables]
    tail = torch.tensor([b for t in tables for b in t[first:]])
    tail2 = torch.cat([tail, tail + nb])
    tw, tail_ctx = need - first, ctx - first * bs
    wst = torch.empty(2 * batch * tw, row)

    def kv_view(flat: torch.Tensor, n: int, width: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = flat.view(2, n, width * bs, kv, d)[:, :, :keys]
        return x[0].transpose(1, 2), x[1].transpose(1, 2)

    def gather_one_sdpa() -> list[torch.Tensor]:
        outs = []
        for c in caches:
            torch.index_select(c.view(2 * nb, row), 0, every2, out=ws)
            k, v = kv_view(ws, batch, need, need * bs)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
        return outs

    def gather_per_seq() -> list[torch.Tensor]:
        outs = []
        for c in caches:
            o = torch.empty_like(q)
            for i in range(batch):
                torch.index_select(c.view(2 * nb, row), 0, per_seq[i], out=ws1)
                k, v = kv_view(ws1, 1, need, ctx)
                o[i] = F.scaled_dot_product_attention(q[i : i + 1], k, v, scale=scale)[0]
            outs.append(o)
        return outs

    def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        lse = torch.stack([p[1] for p in parts])  # [r, ..., g]
        w = torch.softmax(lse, 0)[..., None]
        return (torch.stack([p[0] for p in parts]) * w).sum(0)

    def runs_lse() -> list[torch.Tensor]:
        outs = []
        for c in caches:
            o = torch.empty_like(q)
            for i in range(batch):
                parts, left = [], ctx
                for b0, n in runs[i]:
                    m = min(n * bs, left)
                    left -= m
                    k = c[0, b0 : b0 + n].reshape(1, n * bs, kv, d)[:, :m].transpose(1, 2)
                    v = c[1, b0 : b0 + n].reshape(1, n * bs, kv, d)[:, :m].transpose(1, 2)
                    parts.append(flash(q[i : i + 1], k, v, scale=scale)[:2])
                o[i] = merge(parts)[0]
            outs.append(o)
        return outs

    def prefix_lse() -> list[torch.Tensor]:
        outs = []
        for c in caches:
            po, pl = torch.empty_like(q), torch.empty(batch, kv, g)
            for i in range(batch):
                b0 = tables[i][0]
                k = c[0, b0 : b0 + first].reshape(1, first * bs, kv, d).transpose(1, 2)
                v = c[1, b0 : b0 + first].reshape(1, first * bs, kv, d).transpose(1, 2)
                o1, l1 = flash(q[i : i + 1], k, v, scale=scale)[:2]
                po[i], pl[i] = o1[0], l1[0]
            torch.index_select(c.view(2 * nb, row), 0, tail2, out=wst)
            k, v = kv_view(wst, batch, tw, tail_ctx)
            o2, l2 = flash(q, k, v, scale=scale)[:2]
            outs.append(merge([(po, pl), (o2, l2)]))
        return outs

    nd = native_decode.NativeDecode(torch.arange(batch), torch.full((batch,), ctx, dtype=torch.int32),
                                    torch.tensor(tables, dtype=torch.int32))
    q3 = q.reshape(batch, kv * g, d)

    def native_in_place() -> list[torch.Tensor]:
        outs = []
        for c in caches:
            o = torch.empty_like(q3)
            native_decode.paged_decode(q3, o, c, nd, scale)
            outs.append(o.view_as(q))
        return outs

    def gather_only() -> None:
        for c in caches:
            torch.index_select(c.view(2 * nb, row), 0, every2, out=ws)

    def in_place_contiguous() -> None:
        for c in contiguous:
            k, v = kv_view(c, batch, need, ctx)
            F.scaled_dot_product_attention(q, k, v, scale=scale)

    ref = gather_one_sdpa()
    checked: list[tuple[str, Callable[[], list[torch.Tensor]]]] = [
        ("gather_per_seq", gather_per_seq), ("runs_lse", runs_lse), ("prefix_lse", prefix_lse)]
    variants: dict[str, Callable[[], object]] = {
        "gather_one_sdpa": gather_one_sdpa, "gather_per_seq": gather_per_seq, "runs_lse": runs_lse,
        "prefix_lse": prefix_lse, "gather_only": gather_only, "in_place_contiguous": in_place_contiguous}
    if not isinstance(native_decode.library(), str):  # no compiler: the variant is left out
        checked.append(("native_in_place", native_in_place))
        variants["native_in_place"] = native_in_place
    agree = {name: max(float((a - b).abs().max()) for a, b in zip(fn(), ref, strict=True)) for name, fn in checked}
    kv_bytes = shape.num_layers * batch * ctx * 2 * kv * d * 4
    return {"batch": batch, "context": ctx, "block_size": bs, "prefix_in_place_tokens": prefix,
            "runs_per_sequence": len(runs[0]), "kv_bytes_per_step": kv_bytes,
            **_interleaved(variants, reps, rounds), "max_abs_diff_vs_gather_one_sdpa": agree}


def _step_weights(shape: ModelShape) -> list[torch.Tensor]:
    """Fresh weights of every projection of one decode step, in the model's shapes and order."""
    h, i, kvs = shape.hidden_size, shape.intermediate_size, shape.num_kv_heads * shape.head_dim
    per_layer = [(shape.num_heads * shape.head_dim + 2 * kvs, h), (h, shape.num_heads * shape.head_dim),
                 (2 * i, h), (h, i)]
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, k, generator=gen) * 0.02 for n, k in per_layer * shape.num_layers + [(shape.vocab_size, h)]]


def baseline_kernel(source: Path) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`small_linear.linear` (no bias) by the kernel built from `source` instead (the same flags)."""
    lib = native_build.build(source, small_linear.COMPILE_FLAGS, small_linear.LINK_FLAGS)
    if isinstance(lib, str):
        raise RuntimeError(lib)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.small_linear_f32.argtypes = [p, i64, p, i64, i64, p, p, i64, i64, ctypes.c_int]

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], w.shape[0])
        lib.small_linear_f32(x.data_ptr(), x.stride(0), w.data_ptr(), w.shape[0], w.shape[1], None, y.data_ptr(),
                             w.shape[0], x.shape[0], torch.get_num_threads())
        return y
    return linear


def linear_kernel(shape: ModelShape, batches: tuple[int, ...], bw_gbps: float | None = None, reps: int = 7,
                  rounds: int = 3, matmul_flops: float | None = None,
                  baseline: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Every projection of one decode step at each of `batches` rows: `F.linear` against
    `small_linear.linear` (and `baseline`, another build of it, when given), alternated; per-step ms
    (median of `rounds` interleaved medians), the largest difference between the two, GFLOP/s and
    effective GB/s (weight bytes / wall time) of each, and the floors: weights at `bw_gbps`, FLOPs at
    `matmul_flops`, their max the roofline."""
    ws = _step_weights(shape)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "weight_bytes": sum(w.numel() * 4 for w in ws),
                           "batches": {}}
    if bw_gbps:
        out["weights_read_ms_at_copy_bw"] = out["weight_bytes"] / (bw_gbps * 1e9) * 1e3
    gen = torch.Generator().manual_seed(1)
    for m in batches:
        x = {k: torch.randn(m, k, generator=gen) for k in {w.shape[1] for w in ws}}
        fns: dict[str, Callable[[], object]] = {
            "linear": lambda x=x: [F.linear(x[w.shape[1]], w) for w in ws],
            "native": lambda x=x: [small_linear.linear(x[w.shape[1]], w) for w in ws]}
        if baseline is not None:
            fns["native_baseline"] = lambda x=x: [baseline(x[w.shape[1]], w) for w in ws]
        rec = _interleaved(fns, reps, rounds)
        rec["flops"] = flops = sum(2 * m * w.numel() for w in ws)
        rec["max_abs_diff"] = max(float((F.linear(x[w.shape[1]], w) - small_linear.linear(x[w.shape[1]], w)
                                         ).abs().max()) for w in ws)
        if baseline is not None:
            rec["baseline_bitwise_equal"] = all(torch.equal(baseline(x[w.shape[1]], w),
                                                            small_linear.linear(x[w.shape[1]], w)) for w in ws)
        c, wall = rec["cpu_ms_per_step"], rec["ms_per_step"]
        rec["native_over_linear_cpu"] = c["native"] / c["linear"]
        rec["native_over_linear_wall"] = wall["native"] / wall["linear"]
        rec["gflops_per_s"] = {k: flops / v / 1e6 for k, v in wall.items()}
        rec["effective_gbps"] = {k: out["weight_bytes"] / v / 1e6 for k, v in wall.items()}
        if bw_gbps and matmul_flops:
            floor = {"weights_at_copy_bw": out["weights_read_ms_at_copy_bw"], "flops_at_matmul": flops / matmul_flops * 1e3}
            rec["roofline_ms"] = max(floor.values())
            rec["roofline_parts_ms"] = floor
            rec["over_roofline"] = {k: v / rec["roofline_ms"] for k, v in wall.items()}
        out["batches"][str(m)] = rec
    return out


def projection_costs(shape: ModelShape, batch: int, bw_gbps: float, reps: int = 7, rounds: int = 3,
                     ) -> dict[str, Any]:
    """Every projection of one decode step at `batch` rows (fresh weights of the model's shapes):
    `F.linear` against MKL's prepacked GEMM, against the weights' read time at `bw_gbps`."""
    h, i, kvs = shape.hidden_size, shape.intermediate_size, shape.num_kv_heads * shape.head_dim
    per_layer = [(shape.num_heads * shape.head_dim + 2 * kvs, h), (h, shape.num_heads * shape.head_dim),
                 (2 * i, h), (h, i)]
    shapes = per_layer * shape.num_layers + [(shape.vocab_size, h)]
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=gen) * 0.02 for n, k in shapes]
    x = {k: torch.randn(batch, k, generator=gen) for k in {k for _, k in shapes}}
    out: dict[str, Any] = {"batch": batch, "weight_bytes": sum(w.numel() * 4 for w in ws)}
    out["weights_read_ms_at_copy_bw"] = out["weight_bytes"] / (bw_gbps * 1e9) * 1e3
    fns: dict[str, Callable[[], object]] = {"linear": lambda: [F.linear(x[w.shape[1]], w) for w in ws]}
    try:
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, batch) for w in ws]
        fns["mkl_prepacked"] = lambda: [torch.ops.mkl._mkl_linear(x[w.shape[1]], p, w, None, batch)
                                        for p, w in zip(packed, ws, strict=True)]
        out["mkl_prepacked_bitwise_equal"] = all(
            torch.equal(torch.ops.mkl._mkl_linear(x[w.shape[1]], p, w, None, batch), F.linear(x[w.shape[1]], w))
            for p, w in zip(packed, ws, strict=True))
    except (RuntimeError, AttributeError) as e:  # a torch built without MKL
        out["mkl_prepacked_error"] = repr(e)[:200]
    out.update(_interleaved(fns, reps, rounds))
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """GFLOP/s per row count of each variant, per thread count, beside the roofline's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (t, r) in zip(axes[0], runs.items(), strict=True):
        ms = sorted(r["batches"], key=int)
        rows = [int(m) for m in ms]
        for k in r["batches"][ms[0]]["gflops_per_s"]:
            ax.plot(rows, [r["batches"][m]["gflops_per_s"][k] for m in ms], marker="o", label=k)
        if "roofline_ms" in r["batches"][ms[0]]:
            ax.plot(rows, [r["batches"][m]["flops"] / r["batches"][m]["roofline_ms"] / 1e6 for m in ms], "k--",
                    label="roofline")
        ax.set_xlabel("rows (decode batch)")
        ax.set_ylabel("GFLOP/s, the 33 projections of a step")
        ax.set_title(f"{res['model']}, {t} thread(s), load {res['machine']['loadavg_start'][0]:.1f}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    import argparse
    import json
    import os
    import platform

    import engine_bench  # beside this file: the copy bandwidth and matmul rate, measured as it does

    from pdserve.config import CATALOG

    ap = argparse.ArgumentParser(description="the small-batch linear kernel against F.linear, standalone")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", type=Path, help="another small_linear.c, timed interleaved as native_baseline")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    res: dict[str, Any] = {"machine": {"cpu": cpu, "cpu_count": os.cpu_count(),
                                       "torch": torch.__version__, "loadavg_start": list(os.getloadavg())},
                           "command": "python bench/engine_kernels.py " + " ".join(
                               f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                               for k, v in vars(args).items() if v is not None),
                           "model": args.model, "runs": {}}
    baseline = baseline_kernel(args.baseline) if args.baseline else None
    for t in args.threads:
        torch.set_num_threads(t)
        bw = engine_bench.copy_bandwidth("cpu", 256 << 20)
        mm = engine_bench.matmul_flops("cpu")
        r = linear_kernel(CATALOG[args.model], tuple(args.batches), bw_gbps=bw["gbps_read_plus_write"],
                          rounds=args.rounds, matmul_flops=mm["flops_per_s"], baseline=baseline)
        r["copy_bandwidth"], r["matmul"] = bw, mm
        res["runs"][str(t)] = r
        print(f"threads {t}: copy {bw['gbps_read_plus_write']:.1f} GB/s, matmul {mm['flops_per_s'] / 1e9:.1f} GFLOP/s",
              flush=True)
        for m, rec in r["batches"].items():
            g = "  ".join(f"{k} {v:6.1f}" for k, v in rec["gflops_per_s"].items())
            print(f"threads {t} rows {m:>3}: GFLOP/s {g}  roofline {rec['flops'] / rec['roofline_ms'] / 1e6:6.1f}  "
                  f"native/linear wall {rec['native_over_linear_wall']:.2f} cpu {rec['native_over_linear_cpu']:.2f}  "
                  f"diff {rec['max_abs_diff']:.1e}", flush=True)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    if args.png:
        plot(res, args.png)


if __name__ == "__main__":
    main()
