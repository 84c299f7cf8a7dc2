"""One worker process: `pdserve serve --role colocated|prefill|decode`.

Only the standalone colocated server needs the HTTP front (fastapi, uvicorn) and the tokenizer
(transformers): they are imported there, so a router's worker (`--internal`) starts without them
(about 1.5 s less CPU per worker)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.serve.frontend import OpenAIFront

log = logging.getLogger("pdserve.worker")


def build_colocated(args: argparse.Namespace) -> OpenAIFront:
    """A standalone colocated server: the OpenAI front over an engine in this process."""
    from pdserve.engine.core import EngineCore
    from pdserve.engine.grammar import compiler_factory
    from pdserve.engine.model_runner import ModelRunner
    from pdserve.engine.sampler import BatchSampler
    from pdserve.model.tokenizer import load_tokenizer
    from pdserve.sched.block_manager import BlockManager
    from pdserve.sched.colocated import ColocatedScheduler
    from pdserve.serve.async_engine import LocalBackend
    from pdserve.serve.engine_args import EngineArgs
    from pdserve.serve.frontend import OpenAIFront

    ea = EngineArgs.from_namespace(args)
    ea.apply_threads()
    runner = ModelRunner(ea.model, ea.cache, device=ea.device, dtype=ea.dtype, seed=ea.seed)
    bm = BlockManager(runner.num_blocks, ea.cache.block_size, ea.cache.enable_prefix_caching, ea.cache.eviction,
                      runner.cache_salt)
    shape = runner.shape
    core = EngineCore(runner, ColocatedScheduler(ea.scheduler, bm), sampler=BatchSampler(
        compiler_factory(ea.model, shape.vocab_size, list(shape.eos_token_ids))))
    return OpenAIFront(LocalBackend(core), load_tokenizer(ea.model), args.cluster.public_model_name,
                       api_key=args.api_key)


DRAIN_TIMEOUT_S = 60.0


def _serve_draining(front: OpenAIFront, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then drain: /health answers 503 "draining" and new requests are
    refused while the in-flight ones finish (at most DRAIN_TIMEOUT_S); then exit. A second signal
    stops at once. (uvicorn alone would stop listening at once, so /health could not say why.)"""
    import uvicorn

    from pdserve.serve.async_engine import LocalBackend

    backend = front.backend
    assert isinstance(backend, LocalBackend)
    server = uvicorn.Server(uvicorn.Config(front.app(), host=host, port=port, log_level="warning"))

    async def drain() -> None:
        backend.draining = True
        log.info("draining: %d requests in flight", len(backend.queues))
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while backend.queues and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        server.should_exit = True

    got: list[signal.Signals] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def on_signal(sig: signal.Signals) -> None:
            got.append(sig)
            if backend.draining:
                server.should_exit = True
            else:
                tasks.add(asyncio.create_task(drain()))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # keep ours
        await server.serve()

    asyncio.run(main())
    if got:  # end as uvicorn does: by the signal itself (the interpreter's teardown takes seconds)
        signal.signal(got[0], signal.SIG_DFL)
        signal.raise_signal(got[0])


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.role == "colocated" and not args.internal:
        front = build_colocated(args)
        log.info("colocated worker for %s on http://%s:%d", args.cluster.model, args.host, args.port)
        _serve_draining(front, args.host, args.port)
        return 0
    from pdserve.serve.pd_worker import run_pd_worker

    return run_pd_worker(args)
