"""A decode step on the real engine, alone vs while another process on the host runs prefill steps.

    .venv/bin/python bench/sim_decode_corun.py [--batches 1,4] [--context 512] [--prompt 512]

The direct measurement behind the simulator's `corun_decode_factor` (`pdserve/sim/profile.py`;
`pdserve/bench/prefill_factors.py` reads the same effect off served runs' token gaps). Two processes,
one torch thread each, as `pdserve up` runs its workers on this 2-core machine: this one times
decode steps of the demo model (B sequences of `--context` tokens, the profiler's step), while a
peer process sits idle, runs one-shot prefills of `--prompt` tokens back to back, or runs decode
steps of its own (a control: the simulator charges the factor only while a peer prefills). Phases
are interleaved (idle, prefill, decode, idle, ...) `--rounds` times so the machine's drift lands
on all three; per batch size the medians per phase and their ratios are written to
bench/results/sim_decode_corun.json with the load average before and after. Each step is timed
twice: wall clock, and this process's CPU time (`time.process_time`). On a machine other jobs
load, the wall clock also counts the time this process waits for a core (a busy peer is one more
runnable process); CPU time leaves that out and keeps what the peer's work does to this one's
steps while it runs (shared caches, memory bandwidth, a hyperthread sibling's units): the
contention the factor is about, which the served runs' ratio (both workers always on the cores
of a quiet machine) measures too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdserve.bench.report import header, write_json  # noqa: E402
from pdserve.bench.simcheck import loadavg  # noqa: E402


def _runner(context: int, batch: int, prompt: int) -> tuple[Any, Any]:
    import torch

    from pdserve.config.engine import CacheConfig
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.profiler import ProfilePlan, Profiler

    torch.set_num_threads(1)
    plan = ProfilePlan([prompt], [batch], [context], warmup=0, repeats=1)
    runner = ModelRunner("demo", CacheConfig(16, plan.blocks_needed(16)), device="cpu")

    def step(out: Any) -> None:
        with torch.inference_mode():
            runner.execute(out).argmax(dim=-1)  # greedy sampling, as the engine's step does

    prof = Profiler(runner, plan, step=step, vocab_size=runner.shape.vocab_size)
    return prof, step


def _peer(cmd: Any, ready: Any, args: argparse.Namespace) -> None:
    """The other worker: waits for a phase name, then runs that work until told otherwise."""
    prof, step = _runner(args.context, max(args.batches), args.prompt)
    pre, dec = prof._batch([0], args.prompt), prof._batch([args.context] * max(args.batches), 1)
    step(pre)
    step(dec)
    ready.set()
    phase = "idle"
    while phase != "stop":
        if cmd.poll(0.0 if phase != "idle" else 0.01):
            phase = cmd.recv()
            continue
        if phase == "prefill":
            step(pre)
        elif phase == "decode":
            step(dec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25, help="decode steps timed per phase")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="bench/results/sim_decode_corun.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0, load_before = time.monotonic(), loadavg()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    ready = ctx.Event()
    peer = ctx.Process(target=_peer, args=(child, ready, args), daemon=True)
    peer.start()
    results: dict[str, Any] = {}
    try:
        ready.wait(300)
        for b in args.batches:
            prof, step = _runner(args.context, b, args.prompt)
            out = prof._batch([args.context] * b, 1)
            step(out)
            times: dict[str, list[float]] = {"idle": [], "prefill": [], "decode": []}
            cpu: dict[str, list[float]] = {p: [] for p in times}
            for _ in range(args.rounds):
                for phase in times:
                    parent.send(phase)
                    time.sleep(0.05)  # the peer is into its work (or idle) before the first timed step
                    for _ in range(args.steps):
                        s, c = time.perf_counter(), time.process_time()
                        step(out)
                        times[phase].append(time.perf_counter() - s)
                        cpu[phase].append(time.process_time() - c)
            row: dict[str, Any] = {"batch": b, "context": args.context}
            for name, t in (("wall", times), ("cpu", cpu)):
                med = {p: statistics.median(x) for p, x in t.items()}
                row[name] = {"median_s": med, "prefill_over_idle": med["prefill"] / med["idle"],
                             "decode_over_idle": med["decode"] / med["idle"], "seconds": t}
                print(f"batch {b} x {args.context} ({name}): idle {med['idle'] * 1e3:.2f} ms, peer prefilling "
                      f"{med['prefill'] * 1e3:.2f} ms ({med['prefill'] / med['idle']:.2f}x), peer decoding "
                      f"{med['decode'] * 1e3:.2f} ms ({med['decode'] / med['idle']:.2f}x)", flush=True)
            results[f"batch_{b}"] = row
    finally:
        parent.send("stop")
        peer.join(10)
        if peer.is_alive():
            peer.kill()
    payload = {**header({"batches": args.batches, "context": args.context, "prompt": args.prompt,
                         "steps": args.steps, "rounds": args.rounds}),
               "command": "python " + " ".join(sys.argv), "wall_s": time.monotonic() - t0,
               "load_average": {"before": load_before, "after": loadavg()},
               "peer": "a second process, 1 torch thread, the same demo model: one-shot prefills of --prompt tokens "
                       "back to back (prefill), or decode steps of the largest batch (decode), or idle",
               "results": results}
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
