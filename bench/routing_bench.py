"""Placement, measured on real workers: two colocated workers behind the router's ClusterBackend.

  balance: Poisson traffic with distinct prompts; the old placement (fewest requests by the last
           report, ties to the first worker) vs the load-aware baseline: each worker's busy share.
  prefix:  a Mooncake trace (hash_ids) turned into prompts that share prefixes (block scaled
           down); least_loaded vs prefix_aware: prompt tokens computed, hit rate (and a single
           shared cache's, the ceiling), TTFT p50/p99, goodput, busy split.

The backend runs in this process (no HTTP), so TTFT here is router-to-first-token; the sides of a
comparison run alternately on fresh workers (cold caches) with the same requests.
Usage: python bench/routing_bench.py [balance|prefix|all] [--out bench/results/routing.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pdserve.bench.prefix_prompts import load_hash_trace
from pdserve.bench.prompts import synth_prompts
from pdserve.config.model import resolve_shape
from pdserve.config.schema import RouterConfig
from pdserve.engine.sampler import SamplingParams
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.request import Request
from pdserve.sched.routing import RoutingPolicy, WorkerLoad
from pdserve.serve.router import ClusterBackend
from pdserve.workload import generate

SECRET = "routing-bench"
TRACE = Path("/work/shared/traces/mooncake_synthetic.jsonl")


class OldPolicy(RoutingPolicy):
    """The placement before: fewest requests as last reported (plus dispatches since), ties to the first."""

    def pick_colocated(self, workers: Sequence[WorkerLoad], exclude: frozenset[str] = frozenset(),
                       prompt_tokens: int = 0, hits: dict[str, int] | None = None) -> WorkerLoad | None:
        cands = [w for w in workers if w.available and w.name not in exclude]
        return min(cands, key=lambda w: w.running) if cands else None


def start_workers(n: int, model: str, num_blocks: int, extra: Sequence[Sequence[str]] = ((), ()),
                  roles: Sequence[str] = ("colocated", "colocated"), tag: str = "routing_bench"
                  ) -> list[tuple[subprocess.Popen[str], str]]:
    """`n` workers (`roles[k]`, `extra[k]` flags), each logging to a file; (process, RPC address)."""
    env = {**os.environ, "PDSERVE_CLUSTER_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    out = []
    for k in range(n):
        log = Path(tempfile.gettempdir()) / f"{tag}_worker{k}.log"
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the worker
            p = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--role", roles[k], "--internal",
                                  "--model", model, "--threads", "1", "--host", "127.0.0.1", "--port", "0",
                                  "--num-blocks", str(num_blocks), *extra[k]],
                                 stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
        while True:
            m = re.search(rf"READY {roles[k]} ([0-9.]+:\d+)", log.read_text())
            if m:
                out.append((p, m.group(1)))
                break
            if p.poll() is not None:
                raise RuntimeError(f"worker exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
    return out


async def run_side(policy: RoutingPolicy, routing: str, model: str, specs: list, prompts: list[list[int]],
                   num_blocks: int) -> dict:
    procs = start_workers(2, model, num_blocks)
    try:
        cfg = RouterConfig(routing=routing)  # type: ignore[arg-type]
        policy.routing = routing
        be = ClusterBackend(resolve_shape(model), [], [], [a for _, a in procs], secret=SECRET.encode(),
                            config=cfg, policy=policy)
        picks: dict[str, str] = {}
        attempt = be._attempt

        def recorded(rid: str, prompt: list[int], *rest):  # type: ignore[no-untyped-def]
            stream = attempt(rid, prompt, *rest)
            picks[rid.split("~")[0]] = rest[-1][-1]  # `chosen`: the worker that computes the prompt
            return stream

        be._attempt = recorded  # type: ignore[method-assign]
        await be.start()
        await asyncio.sleep(0.3)
        busy0 = {w.name: w.busy_fraction for w in be.workers}
        t0 = time.monotonic()
        recs: list[dict] = []

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, t0 + specs[i].arrival_s - time.monotonic()))
            start = time.monotonic()
            ttft, cached, n = float("nan"), 0, 0
            params = SamplingParams(max_tokens=specs[i].output_tokens, temperature=0.0, ignore_eos=True)
            async for ev in be.generate(f"r{i}", prompts[i], params):
                if n == 0:
                    ttft = time.monotonic() - start
                n += len(ev.token_ids)
                if ev.finish_reason is not None:
                    cached = ev.num_cached_tokens
            recs.append({"i": i, "worker": picks.get(f"r{i}", ""), "prompt": len(prompts[i]), "cached": cached,
                         "ttft_s": ttft,
                         "e2e_s": time.monotonic() - start, "tokens": n})

        await asyncio.gather(*(one(i) for i in range(len(specs))))
        span = time.monotonic() - t0
        await asyncio.sleep(0.3)  # one more heartbeat
        busy = {}
        for w in be.workers:  # cumulative since each worker started: recover the share of this run
            up1 = w.busy_fraction
            busy[w.name] = up1, busy0[w.name]
        await be.stop()
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(30)
    return {"records": sorted(recs, key=lambda r: r["i"]), "span_s": span, "busy_cumulative": busy}


def summarize(side: dict, slo_ttft_s: float) -> dict:
    recs = side["records"]
    ttfts = sorted(r["ttft_s"] for r in recs)
    prompt = sum(r["prompt"] for r in recs)
    cached = sum(r["cached"] for r in recs)

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))]

    per: dict[str, list[int]] = {}
    for r in recs:
        per.setdefault(r["worker"], [0, 0])
        per[r["worker"]][0] += 1
        per[r["worker"]][1] += r["prompt"] - r["cached"]
    split = sorted(per.values(), key=lambda v: -v[1])
    return {"requests": len(recs), "prompt_tokens": prompt, "cached_tokens": cached,
            "request_split": [v[0] for v in split], "computed_token_split": [v[1] for v in split],
            "prefill_tokens_computed": prompt - cached, "hit_rate": cached / max(1, prompt),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": pct(0.99),
            "goodput_rps": sum(r["ttft_s"] <= slo_ttft_s for r in recs) / side["span_s"],
            "slo_ttft_s": slo_ttft_s, "span_s": side["span_s"]}


def family_rows(path: Path, min_family: int = 8) -> Path:
    """The trace's rows whose first block starts a family of at least `min_family` prompts, in order."""
    rows = [json.loads(line) for line in TRACE.read_text().splitlines() if line.strip()]
    count: dict[int, int] = {}
    for r in rows:
        count[r["hash_ids"][0]] = count.get(r["hash_ids"][0], 0) + 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if count[r["hash_ids"][0]] >= min_family))
    return path


def shared_cache_hit_rate(prompts: list[list[int]], num_blocks: int) -> float:
    """The ceiling: one cache as large as both workers' together, prompts in arrival order."""
    bm = BlockManager(num_blocks, 16)
    total = 0
    for k, p in enumerate(prompts):
        r = Request(str(k), p, 1, 0.0)
        bm.match_prefix(r)
        total += r.num_cached_tokens
        bm.allocate(r, len(p) - r.num_computed_tokens)
        r.num_computed_tokens = len(p)
        bm.cache_full_blocks(r)
        bm.free(r)
    return total / sum(len(p) for p in prompts)


def busy_split(side: dict, run_len: float) -> list[float]:
    """Each worker's busy share during the run, from the heartbeat's cumulative fractions (uptime ~ run)."""
    return sorted((v[0] for v in side["busy_cumulative"].values()), reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="all", choices=["balance", "prefix", "all"])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--out", default="bench/results/routing.json")
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    from pdserve.bench.prompts import vocab_ids

    vocab = vocab_ids(a.model)
    result: dict = {"machine": platform.node(), "cpus": os.cpu_count(), "command": " ".join(sys.argv),
                    "model": a.model, "workers": "2 colocated, 1 thread each", "loadavg_start": os.getloadavg()}
    if a.what in ("balance", "all"):
        specs = generate("search-small", 30, 0.5, seed=1)
        prompts = synth_prompts(specs, vocab, 1)
        sides = {}
        for rep in range(a.reps):
            for name, pol in (("old_fewest_requests", OldPolicy()), ("least_loaded", RoutingPolicy())):
                s = asyncio.run(run_side(pol, "least_loaded", a.model, specs, prompts, 512))
                sides.setdefault(name, []).append({**summarize(s, 2.0), "busy_split": busy_split(s, 0),
                                                   "loadavg": os.getloadavg(), "records": s["records"]})
                print(name, rep, sides[name][-1]["busy_split"], flush=True)
        result["balance"] = {"workload": "search-small, 30 requests, Poisson 0.5 req/s", "sides": sides}
    if a.what in ("prefix", "all"):
        if a.what == "prefix" and Path(a.out).exists():  # keep the other part of an earlier run
            result = {**json.loads(Path(a.out).read_text()), **{k: v for k, v in result.items() if k != "command"}}
        blocks = 128  # KV blocks per worker: fewer than the prompts' distinct prefixes need, twice as many more so
        specs, prompts = load_hash_trace(family_rows(Path(tempfile.gettempdir()) / "routing_bench_rows.jsonl"), vocab,
                                         block_tokens=8, num_requests=80, rate=0.8, max_output_tokens=8,
                                         max_prompt_tokens=256, seed=0)
        sides = {}
        for rep in range(a.reps):
            for name in ("least_loaded", "prefix_aware"):
                s = asyncio.run(run_side(RoutingPolicy(), name, a.model, specs, prompts, blocks))
                sides.setdefault(name, []).append({**summarize(s, 3.0), "busy_split": busy_split(s, 0),
                                                   "loadavg": os.getloadavg(), "records": s["records"]})
                print(name, rep, {k: v for k, v in sides[name][-1].items() if k != "records"}, flush=True)
        result["prefix"] = {"workload": f"{TRACE.name}: first 80 rows of prefix families with >= 8 members "
                                        "(a contiguous stretch shares little: its reuse is long-range), 512-token "
                                        "blocks scaled to 8 tokens, Poisson 0.8 req/s, prompts <= 256, output <= 8, "
                                        "128 KV blocks of 16 tokens per worker",
                            "shared_cache_hit_rate": shared_cache_hit_rate(prompts, 2 * blocks),
                            "one_worker_cache_hit_rate": shared_cache_hit_rate(prompts, blocks), "sides": sides}
    if a.what == "balance" and Path(a.out).exists():  # keep the other part of an earlier run
        old = json.loads(Path(a.out).read_text())
        result = {**old, "balance": result["balance"], "balance_command": result["command"],
                  "balance_loadavg_start": result["loadavg_start"]}
    result["loadavg_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
