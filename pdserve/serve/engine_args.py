"""Command-line flags for one instance (model, cache, scheduling) and what they build."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pdserve.config.engine import CacheConfig, SchedulerConfig


@dataclass
class EngineArgs:
    model: str = "demo"
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    threads: int = 0
    cache: CacheConfig = None  # type: ignore[assignment]
    scheduler: SchedulerConfig = None  # type: ignore[assignment]

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("model and engine")
        g.add_argument("--model", default="demo", help="HF model folder or a catalog name (demo, llama-3.1-8b, ...)")
        g.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
        g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
        g.add_argument("--device", default="cpu", help="cpu or cuda")
        g.add_argument("--seed", type=int, default=0, help="seed of dummy weights")
        g.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--num-blocks", type=int, default=0, help="KV blocks (0: from --kv-cache-memory-gb)")
        g.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
        g.add_argument("--no-prefix-caching", action="store_true")
        g.add_argument("--eviction", choices=["lru", "fifo"], default="lru")
        g.add_argument("--max-num-batched-tokens", type=int, default=512)
        g.add_argument("--max-num-seqs", type=int, default=64)

    @classmethod
    def from_namespace(cls, a: argparse.Namespace) -> EngineArgs:
        return cls(
            model=a.model, dtype=a.dtype, device=a.device, seed=a.seed, threads=a.threads,
            cache=CacheConfig(block_size=a.block_size, num_blocks=a.num_blocks,
                              kv_cache_memory_gb=a.kv_cache_memory_gb,
                              enable_prefix_caching=not a.no_prefix_caching, eviction=a.eviction),
            scheduler=SchedulerConfig(max_num_batched_tokens=a.max_num_batched_tokens,
                                      max_num_seqs=a.max_num_seqs),
        )

    def apply_threads(self) -> None:
        if self.threads > 0:
            import torch  # here, not at the top: `pdserve --help` and the sim need no torch

            torch.set_num_threads(self.threads)
