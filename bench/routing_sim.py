"""Placement at GPU scale, in the simulator, with the router's own RoutingPolicy object.

  balance: 2 colocated H100 instances (llama-3.1-8b), Poisson chatbot traffic: the old placement
           (fewest requests as reported, ties to the first) vs the load-aware baseline.
  prefix:  the Mooncake trace (hash_ids, 512-token blocks as recorded) on colocated H100 instances
           with prefix caching on: least_loaded vs prefix_aware vs one instance as large as all of
           them together (a single shared cache: the hit-rate ceiling); prompt tokens computed,
           hit rate, TTFT p50/p99, busy split.
Usage: python bench/routing_sim.py [--out bench/results/routing_sim.json] [--requests N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

from bench.routing_bench import OldPolicy
from pdserve.bench.prefix_prompts import load_hash_trace
from pdserve.config.load import cluster_from_dict
from pdserve.config.model import resolve_shape
from pdserve.sched.routing import RoutingPolicy
from pdserve.sim.build import SimConfig, build_instances
from pdserve.sim.cluster import Simulator
from pdserve.sim.hardware import get_link
from pdserve.workload import generate

TRACE = Path("/work/shared/traces/mooncake_synthetic.jsonl")
MODEL = "llama-3.1-8b"


def instances(n: int, caching: bool, num_blocks: int = 0) -> list:
    cluster = cluster_from_dict({"model": MODEL, "colocated": {"workers": n}, "prefill": {"workers": 0},
                                 "decode": {"workers": 0}, "cache": {"num_blocks": num_blocks}})
    insts = build_instances(SimConfig(cluster=cluster, prefill_gpu="h100"), resolve_shape(MODEL))
    for i in insts:
        i.policy.block_manager.enable_prefix_caching = caching  # real token ids here: hits are real
    return insts


def summarize(r, insts, specs) -> dict:  # type: ignore[no-untyped-def]
    ttft = sorted(f - a for f, a in zip(r.first_token, r.arrival, strict=True) if f == f)
    prompt = sum(s.prompt_tokens for s in specs)
    hits = sum(i.policy.block_manager.hits for i in insts) * insts[0].policy.block_manager.block_size
    return {"finished": len(ttft), "prompt_tokens": prompt, "cached_tokens": hits,
            "prefill_tokens_computed": prompt - hits, "hit_rate": hits / prompt,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
            "busy_split": sorted((x["busy_frac"] for x in r.instances.values()), reverse=True),
            "duration_s": r.duration, "wall_s": r.wall_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/routing_sim.json")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--instances", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=1.0)
    a = ap.parse_args()
    out: dict = {"machine": platform.node(), "command": " ".join(sys.argv), "model": MODEL, "gpu": "h100 (modelled)",
                 "loadavg_start": os.getloadavg()}
    specs = generate("chatbot", 1000, 1.0, seed=0)
    bal = {}
    for name, pol in (("old_fewest_requests", OldPolicy(decode_serves_whole=False)),
                      ("least_loaded", RoutingPolicy(decode_serves_whole=False))):
        insts = instances(2, False)
        r = Simulator(insts, resolve_shape(MODEL), get_link("cx7-400g"), routing=pol).run(specs)
        bal[name] = summarize(r, insts, specs)
        print(name, bal[name], flush=True)
    out["balance"] = {"workload": "chatbot preset, 1000 requests, Poisson 1 req/s, 2 colocated H100", "sides": bal}

    vocab = list(range(32000))
    specs, prompts = load_hash_trace(TRACE, vocab, 512, a.requests, None, a.time_scale)
    pre = {}
    n = a.instances
    for name, count in (("least_loaded", n), ("prefix_aware", n), ("single_shared_cache", 1)):
        insts = instances(count, True)
        if count == 1:  # one cache as large as all n; compute as fast as all n would not be modelled: hit rate only
            bm = insts[0].policy.block_manager
            bm.__init__(bm.num_blocks * n, bm.block_size, True, bm.eviction, bm.salt)
        pol = RoutingPolicy(routing="prefix_aware" if name == "prefix_aware" else "least_loaded",
                            decode_serves_whole=False)
        r = Simulator(insts, resolve_shape(MODEL), get_link("cx7-400g"), routing=pol).run(specs, prompts=prompts)
        pre[name] = summarize(r, insts, specs)
        print(name, pre[name], flush=True)
    out["prefix"] = {"workload": f"{TRACE.name}: first {a.requests} rows, trace times x {a.time_scale}, 512-token "
                                 f"blocks as recorded, {n} colocated H100 (KV: what fits beside the weights); "
                                 "single_shared_cache: one instance with all n caches' blocks (TTFT not comparable)",
                     "sides": pre}
    out["loadavg_end"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(out, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x))


if __name__ == "__main__":
    main()
