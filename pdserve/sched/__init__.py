"""Pure scheduling policies: no torch, no I/O, no clock reads. Engine and simulator share them."""

from pdserve.sched.block_manager import BlockManager
from pdserve.sched.colocated import ColocatedScheduler
from pdserve.sched.decode import DecodeScheduler
from pdserve.sched.output import ScheduledChunk, SchedulerOutput
from pdserve.sched.prefill import PrefillBatcher
from pdserve.sched.request import Request, RequestStatus

__all__ = [
    "BlockManager",
    "ColocatedScheduler",
    "DecodeScheduler",
    "PrefillBatcher",
    "Request",
    "RequestStatus",
    "ScheduledChunk",
    "SchedulerOutput",
]
