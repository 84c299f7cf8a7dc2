"""What a worker process keeps across role switches (serve/role_host.py): weights, KV memory, the
RPC server, its identity and its counters. Each role's class is built over one `Shared`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pdserve.engine.model_runner import ModelRunner
from pdserve.sched.block_manager import BlockManager
from pdserve.serve import messages as m
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.rpc import Peer, RpcServer, cluster_secret
from pdserve.serve.telemetry import WorkerTelemetry
from pdserve.transfer.pairing import node_identity


@dataclass
class Shared:
    """What a worker keeps across role switches: weights, KV memory (and its prefix cache), the
    RPC server the router talks to, its identity and its counters."""

    runner: ModelRunner
    bm: BlockManager
    rpc: RpcServer
    secret: bytes | None
    node_id: str
    telemetry: WorkerTelemetry

    @classmethod
    def load(cls, args: argparse.Namespace, ea: EngineArgs) -> Shared:
        runner = ModelRunner(ea.model, ea.cache, device=ea.device, dtype=ea.dtype, seed=ea.seed)
        bm = BlockManager(runner.num_blocks, ea.cache.block_size, ea.cache.enable_prefix_caching,
                          ea.cache.eviction, runner.cache_salt)
        if ea.cache.enable_prefix_caching:
            bm.record_events()  # published to the router's prefix index with each heartbeat
        secret = cluster_secret()
        rpc = RpcServer(_unset_handler, args.host, args.port, secret)  # the role sets its handler
        return cls(runner, bm, rpc, secret, node_identity(), WorkerTelemetry())


async def _unset_handler(msg: m.ToWorker, peer: Peer) -> None:
    raise RuntimeError("no role is serving yet")
