"""A cluster worker process: the role's class over the shared base, speaking the internal RPC.

`worker_base` holds what every role shares; `colocated_worker`, `prefill_worker` and
`decode_worker` each read top to bottom as one role's admission and lifecycle.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from pdserve.serve.colocated_worker import ColocatedWorker
from pdserve.serve.decode_worker import DecodeWorker
from pdserve.serve.prefill_worker import PrefillWorker
from pdserve.serve.worker_base import WorkerBase

ROLES: dict[str, type[WorkerBase]] = {  # type: ignore[type-arg]
    "colocated": ColocatedWorker, "prefill": PrefillWorker, "decode": DecodeWorker}


def make_worker(args: argparse.Namespace) -> WorkerBase:  # type: ignore[type-arg]
    """The worker for `args.role`."""
    try:
        cls = ROLES[args.role]
    except KeyError:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {args.role!r}") from None
    return cls(args)


def run_pd_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(make_worker(args).run())
    return 0
