"""One worker process: `pdserve serve --role colocated|prefill|decode`."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from pdserve.engine.core import EngineCore
from pdserve.engine.model_runner import ModelRunner
from pdserve.model.tokenizer import load_tokenizer
from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.serve.async_engine import LocalBackend
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.frontend import OpenAIFront

log = logging.getLogger("pdserve.worker")


def build_colocated(args: argparse.Namespace) -> OpenAIFront:
    """A standalone colocated server: the OpenAI front over an engine in this process."""
    ea = EngineArgs.from_namespace(args)
    ea.apply_threads()
    runner = ModelRunner(ea.model, ea.cache, device=ea.device, dtype=ea.dtype, seed=ea.seed)
    bm = BlockManager(runner.num_blocks, ea.cache.block_size, ea.cache.enable_prefix_caching, ea.cache.eviction,
                      runner.cache_salt)
    core = EngineCore(runner, ColocatedScheduler(ea.scheduler, bm))
    return OpenAIFront(LocalBackend(core), load_tokenizer(ea.model), args.cluster.public_model_name,
                       api_key=args.api_key)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.role == "colocated" and not args.internal:
        front = build_colocated(args)
        log.info("colocated worker for %s on http://%s:%d", args.cluster.model, args.host, args.port)
        uvicorn.run(front.app(), host=args.host, port=args.port, log_level="warning")
        return 0
    from pdserve.serve.pd_worker import run_pd_worker

    return run_pd_worker(args)
