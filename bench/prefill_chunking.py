"""Prefill-role compute: one shot vs chunked (`prefill.chunk_tokens`), in-process, engine CPU time.

    python bench/prefill_chunking.py [--lengths 2048 8192] [--chunks 0 512 2048] [--reps 3]
                                     [--label quiet] [--out bench/results/prefill_chunking.json]

One prompt at a time through the real PrefillBatcher + EngineCore + ModelRunner (demo shape,
dummy weights, one torch thread), the variants interleaved within each repetition. The figure is
the engine thread's CPU time (`time.thread_time`), which other jobs on the cores inflate far less
than wall time; wall time is recorded beside it. Chunk 0 is one shot (the default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve.config.engine import CacheConfig, PrefillConfig  # noqa: E402
from pdserve.engine.core import EngineCore  # noqa: E402
from pdserve.engine.model_runner import ModelRunner  # noqa: E402
from pdserve.engine.sampler import SamplingParams  # noqa: E402
from pdserve.sched.block_manager import BlockManager  # noqa: E402
from pdserve.sched.prefill import PrefillBatcher  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--label", default="quiet")
    ap.add_argument("--out", default=str(ROOT / "bench/results/prefill_chunking.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    runner = ModelRunner("demo", CacheConfig(block_size=16, num_blocks=max(args.lengths) // 16 + 8))
    rng = np.random.default_rng(0)
    raw: list[dict] = []
    for L in args.lengths:
        for rep in range(args.reps):
            for c in args.chunks:
                if c >= L:
                    continue
                bm = BlockManager(runner.num_blocks, 16, enable_prefix_caching=False)
                policy = PrefillBatcher(PrefillConfig(max_batch_tokens=max(args.lengths), chunk_tokens=c), bm)
                core = EngineCore(runner, policy)
                req = core.make_request(f"{L}-{rep}-{c}", rng.integers(3, 3900, size=L).tolist(),
                                        SamplingParams(temperature=0, max_tokens=2))
                core.add(req)
                cpu, wall = time.thread_time(), time.perf_counter()
                while policy.has_work():
                    core.step()
                raw.append({"tokens": L, "chunk_tokens": c, "rep": rep, "cpu_s": time.thread_time() - cpu,
                            "wall_s": time.perf_counter() - wall})
                policy.release(req, 0.0)
                print(f"L={L} chunk={c} rep={rep}: cpu {raw[-1]['cpu_s']:.2f}s wall {raw[-1]['wall_s']:.2f}s", flush=True)
    summary = []
    for L in args.lengths:
        one = statistics.median(r["cpu_s"] for r in raw if r["tokens"] == L and r["chunk_tokens"] == 0)
        for c in args.chunks:
            rs = [r for r in raw if r["tokens"] == L and r["chunk_tokens"] == c]
            if rs:
                m = statistics.median(r["cpu_s"] for r in rs)
                summary.append({"tokens": L, "chunk_tokens": c, "cpu_median_s": m,
                                "wall_median_s": statistics.median(r["wall_s"] for r in rs),
                                "vs_one_shot": m / one})
    out = {"label": args.label, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": "python bench/prefill_chunking.py " + " ".join(sys.argv[1:]),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(), "torch_threads": 1},
           "model": "demo (dummy weights)", "peer": "one shot (chunk_tokens 0) on the same thread",
           "summary": summary, "raw": raw}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for s in summary:
        print(f"{s['tokens']:>5} chunk {s['chunk_tokens']:>5}: cpu {s['cpu_median_s']:.2f}s ({s['vs_one_shot']:.2f}x one shot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
