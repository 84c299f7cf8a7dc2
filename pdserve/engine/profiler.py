"""`pdserve profile`: time the real model runner and write a profile the simulator can fit.

Every point is one engine step built by hand, exactly as a scheduler would hand it to the runner:
  prefill n     one sequence, n new tokens, nothing cached          -> [n, seconds]
  decode B, c   B sequences, one new token each after c cached ones -> [B, c, seconds]
(c is the KV already in the cache, the `prior` the simulator passes for decode chunks.) A step is
`ModelRunner.execute` plus greedy sampling (argmax), with a device sync on CUDA; each point is the
median of `repeats` runs after `warmup` runs. The file format is `pdserve/sim/profile.py`'s.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pdserve.sched.block_manager import BlockManager
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.request import Request

DEFAULT_PREFILL = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
DEFAULT_CONTEXTS = (64, 128, 256, 512, 1024)


class Runner(Protocol):
    """What the profiler needs from `ModelRunner` (a fake in tests)."""

    block_size: int
    num_blocks: int

    def execute(self, out: SchedulerOutput) -> Any: ...


@dataclass
class ProfilePlan:
    prefill_tokens: Sequence[int] = DEFAULT_PREFILL
    batch_sizes: Sequence[int] = DEFAULT_BATCHES
    contexts: Sequence[int] = DEFAULT_CONTEXTS
    warmup: int = 2
    repeats: int = 5

    def blocks_needed(self, block_size: int) -> int:
        """KV blocks the largest step holds: the longest prefill or the biggest decode batch."""
        pre = max((-(-n // block_size) for n in self.prefill_tokens), default=0)
        dec = max(self.batch_sizes, default=0) * -(-(max(self.contexts, default=0) + 1) // block_size)
        return max(pre, dec, 1)


@dataclass
class Profiler:
    runner: Runner
    plan: ProfilePlan = field(default_factory=ProfilePlan)
    step: Callable[[SchedulerOutput], None] | None = None  # runs one step (default: runner.execute)
    clock: Callable[[], float] = time.perf_counter
    log: Callable[[str], None] | None = None
    vocab_size: int = 32

    def _run(self, out: SchedulerOutput) -> float:
        step = self.step or self.runner.execute
        for _ in range(self.plan.warmup):
            step(out)
        times = []
        for _ in range(max(1, self.plan.repeats)):
            t0 = self.clock()
            step(out)
            times.append(self.clock() - t0)
        return statistics.median(times)

    def _batch(self, contexts: list[int], new_tokens: int) -> SchedulerOutput:
        """Requests with `c` tokens already in the cache and `new_tokens` to compute, blocks allocated."""
        bm = BlockManager(self.runner.num_blocks, self.runner.block_size, enable_prefix_caching=False)
        out = SchedulerOutput()
        for i, c in enumerate(contexts):
            ids = [(7 * i + 3 * k + 1) % self.vocab_size for k in range(c + new_tokens)]
            req = Request(f"p{i}", ids, max_tokens=1, arrival_time=0.0)
            req.num_computed_tokens = c
            if not bm.allocate(req, new_tokens):
                raise ValueError(f"the KV cache ({self.runner.num_blocks} blocks) cannot hold this step")
            out.chunks.append(ScheduledChunk(req, new_tokens, True))
        return out

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def run(self) -> tuple[list[list[float]], list[list[float]]]:
        plan = self.plan
        prefill: list[list[float]] = []
        decode: list[list[float]] = []
        total = len(plan.prefill_tokens) + len(plan.batch_sizes) * len(plan.contexts)
        k = 0
        for n in plan.prefill_tokens:
            t = self._run(self._batch([0], n))
            prefill.append([n, t])
            k += 1
            self._say(f"[{k}/{total}] prefill {n:>5} tokens: {t * 1e3:9.3f} ms ({n / t:,.0f} tok/s)")
        for b in plan.batch_sizes:
            for c in plan.contexts:
                t = self._run(self._batch([c] * b, 1))
                decode.append([b, c, t])
                k += 1
                self._say(f"[{k}/{total}] decode batch {b:>3} x context {c:>5}: {t * 1e3:9.3f} ms "
                          f"({b / t:,.0f} tok/s)")
        return prefill, decode


def profile_model(model: str = "demo", device: str = "cpu", dtype: str | None = None, threads: int | None = 1,
                  plan: ProfilePlan | None = None, block_size: int = 16,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure `model` on `device`; return the profile dict (`pdserve/sim/profile.py` format)."""
    import torch

    from pdserve.config.engine import CacheConfig
    from pdserve.engine.model_runner import ModelRunner

    if threads:
        torch.set_num_threads(threads)
    plan = plan or ProfilePlan()
    num_blocks = plan.blocks_needed(block_size)
    runner = ModelRunner(model, CacheConfig(block_size, num_blocks), device=device, dtype=dtype)
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)

    def step(out: SchedulerOutput) -> None:
        with torch.inference_mode():
            logits = runner.execute(out)
            logits.argmax(dim=-1)  # greedy sampling, as the engine's step does
        sync()

    prof = Profiler(runner, plan, step=step, log=log, vocab_size=runner.shape.vocab_size)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    prefill, decode = prof.run()
    if runner.device.type == "cuda":
        dev = f"cuda: {torch.cuda.get_device_name(runner.device)}"
    else:
        dev = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"
    return {"model": model, "device": dev, "tp": 1, "dtype": runner.shape.dtype, "block_size": block_size,
            "torch": torch.__version__, "warmup": plan.warmup, "repeats": plan.repeats,
            # How the decode attention cost grows, for the simulator (pdserve/sim/profile.py):
            # the CUDA kernel reads each sequence's own context, the CPU path groups by length.
            "attention": "varlen" if runner.device.type == "cuda" else "grouped",
            "statistic": "median", "load_average_1min": [load0, os.getloadavg()[0] if load0 is not None else None],
            "prefill": prefill, "decode": decode}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(args: Any) -> int:
    """The `pdserve profile` handler (argparse namespace from pdserve/sim/commands.py)."""
    plan = ProfilePlan(_ints(args.prefill_tokens), _ints(args.batch_sizes), _ints(args.contexts),
                       args.warmup, args.repeats)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"profiling {args.model} on {args.device} ({args.threads or 'default'} thread(s)), "
        f"{len(plan.prefill_tokens)} prefill + {len(plan.batch_sizes) * len(plan.contexts)} decode points")
    prof = profile_model(args.model, args.device, args.dtype, args.threads, plan, args.block_size, log)
    argv = sys.argv[sys.argv.index("profile") + 1 :] if "profile" in sys.argv else []
    prof["command"] = " ".join(["pdserve profile", *argv])
    Path(args.out).write_text(json.dumps(prof, indent=1))

    from pdserve.sim.profile import ProfiledModel

    fit = ProfiledModel.fit(prof)
    errs = [abs(fit.prefill_time([int(n)]) - t) / t for n, t in prof["prefill"]]
    errs += [abs(fit.decode_time([int(c)] * int(b)) - t) / t for b, c, t in prof["decode"]]
    log(f"wrote {args.out}; fitted prefill a,b,c = {fit.prefill_coef}, decode a,b,c = {fit.decode_coef}; "
        f"fit error median {statistics.median(errs):.1%}, max {max(errs):.1%}")
    return 0
