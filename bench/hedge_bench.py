"""Hedged prefill, measured on real workers: 2 prefill workers (one slowed by fault injection,
`fault_prompt_delay_ms`) and 1 decode worker behind the router's ClusterBackend.

Sides, each on fresh workers with the same requests: no hedging; hedging; hedging with no slow
worker. Per side: TTFT p50/p99, hedges sent and won, the hedged fraction against its cap, whether
every output equals the unhedged side's, and whether every KV block came back (each worker's
free blocks == total, nothing running) once the requests are done.
Usage: python bench/hedge_bench.py [--out bench/results/hedge.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench.routing_bench import SECRET, start_workers
from pdserve.bench.prompts import synth_prompts, vocab_ids
from pdserve.config.model import resolve_shape
from pdserve.config.schema import RouterConfig
from pdserve.engine.sampler import SamplingParams
from pdserve.serve.router import ClusterBackend
from pdserve.workload import generate


async def side(model: str, slow_ms: float, cfg: RouterConfig, specs: list, prompts: list[list[int]]) -> dict:
    extra = (("--fault-prompt-delay-ms", str(slow_ms)) if slow_ms else (), (), ())
    procs = start_workers(3, model, 256, extra, ("prefill", "prefill", "decode"), tag="hedge_bench")
    try:
        addrs = [a for _, a in procs]
        be = ClusterBackend(resolve_shape(model), addrs[:2], addrs[2:], [], secret=SECRET.encode(), config=cfg)
        await be.start()
        t0 = time.monotonic()
        recs: list[dict] = []

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + specs[i].arrival_s - time.monotonic()))
            start, ttft, toks = time.monotonic(), float("nan"), []
            params = SamplingParams(max_tokens=specs[i].output_tokens, temperature=0.0, ignore_eos=True)
            timings: dict[str, float] = {}
            async for ev in be.generate(f"r{i}", prompts[i], params):
                if not toks:
                    ttft = time.monotonic() - start
                toks += ev.token_ids
                if ev.finish_reason is not None:
                    timings = ev.timings
            recs.append({"i": i, "ttft_s": ttft, "tokens": toks, "hedged": bool(timings.get("hedged")),
                         "hedge_won": bool(timings.get("hedge_won"))})

        await asyncio.gather(*(one(i) for i in range(len(specs))))
        await asyncio.sleep(1.0)  # aborts land, reservations drop
        await asyncio.gather(*(w.heartbeat() for w in be.workers))
        blocks = {w.name: [w.load.free_blocks, w.load.total_blocks, w.load.running] for w in be.workers}
        hedges, wins = be.hedges, be.hedge_wins
        await be.stop()
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(30)
    recs.sort(key=lambda r: r["i"])
    ttfts = sorted(r["ttft_s"] for r in recs)
    return {"ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "hedges": hedges, "hedge_wins": wins, "hedged_fraction": hedges / len(recs),
            "cap": cfg.hedge_max_fraction, "blocks_free_total_running": blocks,
            "every_block_back": all(f == t and r == 0 for f, t, r in blocks.values()),
            "loadavg": os.getloadavg(), "records": recs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", default="bench/results/hedge.json")
    ap.add_argument("--slow-ms", type=float, default=4000)
    ap.add_argument("--after-ms", type=float, default=1500)
    ap.add_argument("--percentile", type=float, default=0)
    ap.add_argument("--earlier", default=None, help="an earlier run's JSON to keep beside this one (its summary)")
    a = ap.parse_args()
    specs = generate("search-small", 30, 1.0, seed=2)
    prompts = synth_prompts(specs, vocab_ids(a.model), 2)
    hedge = RouterConfig(hedge_after_ms=a.after_ms, hedge_percentile=a.percentile, hedge_max_fraction=0.3)
    res = {"machine": platform.node(), "command": " ".join(sys.argv), "model": a.model,
           "cluster": "2 prefill (prefill0 slowed by --fault-prompt-delay-ms) + 1 decode, 1 thread each",
           "workload": "search-small, 30 requests, Poisson 1 req/s", "slow_ms": a.slow_ms,
           "hedge": {"hedge_after_ms": a.after_ms, "hedge_percentile": a.percentile, "hedge_max_fraction": 0.3},
           "loadavg_start": os.getloadavg(), "sides": {}}
    if a.earlier:
        old = json.loads(Path(a.earlier).read_text())
        res["earlier_run"] = {"hedge": old["hedge"], "slow_ms": old["slow_ms"],
                              "sides": {n: {k: v for k, v in s.items() if k != "records"} for n, s in old["sides"].items()}}
    for name, slow, cfg in (("no_hedge", a.slow_ms, RouterConfig()), ("hedge", a.slow_ms, hedge),
                            ("hedge_no_slow_worker", 0, hedge)):
        res["sides"][name] = asyncio.run(side(a.model, slow, cfg, specs, prompts))
        print(name, {k: v for k, v in res["sides"][name].items() if k != "records"}, flush=True)
    base = [r["tokens"] for r in res["sides"]["no_hedge"]["records"]]
    for s in res["sides"].values():
        s["outputs_identical_to_no_hedge"] = [r["tokens"] for r in s["records"]] == base
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
