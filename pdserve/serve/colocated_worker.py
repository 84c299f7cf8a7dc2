"""The colocated role in a cluster: a whole request (prefill and decode) on this worker.

Generate ──▶ queue ──▶ chunked prefill, then continuous-batching decode ──▶ Tokens(...) stream.
The router sends it the monolithic baseline, short prompts and fallbacks after a failed transfer.
"""

from __future__ import annotations

import argparse

from pdserve.sched.colocated import ColocatedScheduler
from pdserve.serve import messages as m
from pdserve.serve.engine_args import EngineArgs
from pdserve.serve.rpc import Peer
from pdserve.serve.worker_base import WorkerBase


class ColocatedWorker(WorkerBase[ColocatedScheduler]):
    role = "colocated"

    def _make_policy(self, args: argparse.Namespace, ea: EngineArgs) -> ColocatedScheduler:
        return ColocatedScheduler(ea.scheduler, self.bm)

    async def _handle_work(self, msg: m.ToWorker, peer: Peer) -> None:
        if isinstance(msg, m.Generate):
            self._admit(msg, peer)
        else:
            await super()._handle_work(msg, peer)
