"""One benchmark run: the workload's requests, their prompts, the load client, the summary.

Shared by `pdserve bench run` (one server, one rate) and `pdserve bench compare` (two clusters,
a sweep of rates). The same (workload, rate, seed) always gives the same requests and prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from dataclasses import dataclass
from typing import Any

from pdserve.bench.client import RunResult, run_requests
from pdserve.bench.prompts import synth_prompts, vocab_ids
from pdserve.bench.report import summarize_run
from pdserve.metrics_summary import SLO
from pdserve.workload import PRESETS, RequestSpec, generate


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model name sent to the server; also its tokenizer")
    p.add_argument("--tokenizer", default=None, help="model folder whose tokenizer to use (default: --model)")
    p.add_argument("--workload", default="search-small", choices=sorted(PRESETS),
                   help="length preset (ignored for lengths when --trace is given)")
    p.add_argument("--num-requests", type=int, default=64, help="requests to send")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "trace"],
                   help="arrival process; 'trace' replays --trace's own times")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals: >1 is burstier")
    p.add_argument("--seed", type=int, default=0, help="workload seed (lengths, arrivals, prompts)")
    p.add_argument("--trace", default=None, help="CSV trace (arrived_at,num_prefill_tokens,num_decode_tokens), or JSON lines with hash_ids")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply trace arrival times")
    p.add_argument("--hash-block-tokens", type=int, default=512,
                   help="JSON-lines trace with hash_ids: tokens per hashed block (512 as recorded; less scales it down)")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply prompt and output lengths")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="clip prompt lengths")
    p.add_argument("--max-output-tokens", type=int, default=None, help="clip output lengths")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO for goodput and attainment")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO for goodput and attainment")
    p.add_argument("--slo-itl-ms", type=float, default=None,
                   help="SLO on each request's worst inter-token gap (streaming smoothness)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def slo_from(args: argparse.Namespace) -> SLO:
    return SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, itl_ms=args.slo_itl_ms)


def specs_for(args: argparse.Namespace, rate: float) -> list[RequestSpec]:
    return generate(args.workload, args.num_requests, rate, arrival=args.arrival, burstiness=args.burstiness,
                    seed=args.seed, trace=args.trace, time_scale=args.time_scale,
                    length_scale=args.length_scale, max_prompt_tokens=args.max_prompt_tokens,
                    max_output_tokens=args.max_output_tokens)


def workload_config(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "workload", "num_requests", "arrival", "burstiness", "seed", "trace", "time_scale",
            "length_scale", "max_prompt_tokens", "max_output_tokens", "max_concurrency", "slo_ttft_ms",
            "slo_tpot_ms", "slo_itl_ms")
    return {k: getattr(args, k) for k in keys}


@dataclass
class Prepared:
    """Requests and prompts for one rate, made once and sent to every system under test."""

    rate: float
    specs: list[RequestSpec]
    prompts: list[list[int]]


def prepare(args: argparse.Namespace, rate: float, ids: list[int] | None = None, fresh: int = 0) -> Prepared:
    """Requests and prompts for one rate; `fresh` picks a different prompt set (same lengths), so
    a sweep's rates never re-send a prompt another rate's run left in a prefix cache.

    A `.jsonl` trace with per-block `hash_ids` (the Mooncake layout) gets prompts that share exactly
    the prefixes those ids say (`pdserve.bench.prefix_prompts`); others share nothing.
    """
    ids = ids if ids is not None else vocab_ids(args.tokenizer or args.model)
    seed = args.seed + 1_000 * fresh
    if args.trace and str(args.trace).endswith(".jsonl"):  # per-block hash ids: prompts share prefixes
        from pdserve.bench.prefix_prompts import load_hash_trace

        specs, prompts = load_hash_trace(args.trace, ids, args.hash_block_tokens, args.num_requests,
                                         None if args.arrival == "trace" else rate, args.time_scale,
                                         args.max_output_tokens, args.max_prompt_tokens, seed)
        return Prepared(rate, specs, prompts)
    specs = specs_for(args, rate)
    return Prepared(rate, specs, synth_prompts(specs, ids, seed))


def run_once(url: str, args: argparse.Namespace, prep: Prepared) -> tuple[dict[str, Any], RunResult]:
    run = asyncio.run(run_requests(url, args.model, prep.specs, prep.prompts, args.max_concurrency,
                                   progress=not args.no_progress))
    res = summarize_run(run, slo_from(args))
    res["request_rate"] = prep.rate if not math.isinf(prep.rate) else "inf"
    return res, run
