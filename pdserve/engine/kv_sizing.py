"""How many KV blocks a worker gets: set explicitly, or sized from the device's memory (as vLLM).

On CUDA, with neither `num_blocks` nor `kv_cache_memory_gb` set, the worker may use
`gpu_memory_utilization` x the device's total memory; the KV cache gets that budget minus the
weights, minus the activation peak of one profiled forward pass (measured, not estimated), minus a
reserve for the decode CUDA graphs' private memory pool. On CPU, and whenever a size is given,
the size is what the settings say. The arithmetic is `kv_cache_bytes`, a pure function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.config.schema import CPU_KV_CACHE_GB, CacheConfig

if TYPE_CHECKING:
    from pdserve.engine.model_runner import ModelRunner

GIB = 2**30
PROFILE_TOKENS = 2048  # one prefill step as large as the default prefill budget (prefill.max_batch_tokens)
GRAPH_RESERVE_BYTES = 512 * 2**20  # the captured decode graphs' pool: logits and activations of <= a few hundred rows
MIN_BLOCKS = 4
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryReport:
    """What the sizing saw and decided, in bytes (logged at start-up)."""

    total: int
    free: int
    utilization: float
    weights: int
    activation_peak: int
    reserve: int
    kv_bytes: int


def kv_cache_bytes(
    *, total: int, free: int, utilization: float, weights: int, activation_peak: int, reserve: int
) -> int:
    """KV bytes = utilization x total - weights - activation peak - reserve.

    `free` is what this process can still obtain (free device memory plus its allocator's cached,
    unused memory) once the weights are loaded. The budget must fit in it: memory held by other
    processes is not ours to take. Raises ValueError, naming the settings to change, when nothing
    is left for KV or the budget exceeds what is free.
    """
    budget = int(utilization * total)
    kv = budget - weights - activation_peak - reserve
    if kv <= 0:
        raise ValueError(
            f"gpu_memory_utilization {utilization} gives {budget / GIB:.2f} GiB, but the weights "
            f"({weights / GIB:.2f} GiB), the activation peak ({activation_peak / GIB:.2f} GiB) and the "
            f"graph reserve ({reserve / GIB:.2f} GiB) leave nothing for the KV cache: raise "
            "gpu_memory_utilization or set kv_cache_memory_gb")
    if kv + activation_peak + reserve > free:
        raise ValueError(
            f"gpu_memory_utilization {utilization} asks for {kv / GIB:.2f} GiB of KV cache, but only "
            f"{max(0, free - activation_peak - reserve) / GIB:.2f} GiB are free for it (another process "
            "holds the rest?): lower gpu_memory_utilization or set kv_cache_memory_gb")
    return kv


def blocks_for_bytes(kv_bytes: float, bytes_per_block: int) -> int:
    return max(MIN_BLOCKS, int(kv_bytes // bytes_per_block))


def sized_from_memory(cache: CacheConfig, device: str) -> bool:
    """Whether the KV cache is sized from the device's free memory (cuda, and no size given)."""
    return device.startswith("cuda") and not cache.num_blocks and not cache.kv_cache_memory_gb


def kv_blocks_for(runner: ModelRunner, cache: CacheConfig) -> int:
    """The runner's block count: `num_blocks`, or `kv_cache_memory_gb`, or (cuda) from free memory."""
    per_block = cache.block_size * runner.shape.kv_bytes_per_token()
    if cache.num_blocks:
        return cache.num_blocks
    if not sized_from_memory(cache, str(runner.device)):
        return blocks_for_bytes((cache.kv_cache_memory_gb or CPU_KV_CACHE_GB) * GIB, per_block)
    report = measure(runner, cache)
    log.info("KV cache sized from device memory: %s", report)
    return blocks_for_bytes(report.kv_bytes, per_block)


def measure(runner: ModelRunner, cache: CacheConfig) -> MemoryReport:  # pragma: no cover - needs CUDA
    """Profile one PROFILE_TOKENS-token prefill on a scratch cache; size the KV cache from what is left."""
    import torch

    from pdserve.sched.output import ScheduledChunk, SchedulerOutput
    from pdserve.sched.request import Request

    dev = runner.device
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(dev)  # all this process holds yet: the weights (and rope tables)
    n = min(PROFILE_TOKENS, runner.shape.max_model_len)
    nb = -(-n // cache.block_size)
    s = runner.shape
    runner.kv_caches = [torch.zeros(2, nb, cache.block_size, s.num_kv_heads, s.head_dim, dtype=runner.dtype,
                                    device=dev) for _ in range(s.num_layers)]
    scratch = torch.cuda.memory_allocated(dev) - weights
    torch.cuda.reset_peak_memory_stats(dev)
    req = Request("profile", [0] * n, max_tokens=1, arrival_time=0.0, block_ids=list(range(nb)))
    runner.execute(SchedulerOutput([ScheduledChunk(req, n, sample=True)]))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - weights - scratch
    runner.kv_caches = []
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    reserve = 0 if cache.enforce_eager else GRAPH_RESERVE_BYTES
    kv = kv_cache_bytes(total=total, free=free, utilization=cache.gpu_memory_utilization, weights=weights,
                        activation_peak=peak, reserve=reserve)
    return MemoryReport(total, free, cache.gpu_memory_utilization, weights, peak, reserve, kv)
