"""What one worker process builds its engine from: its cluster's settings and its role."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pdserve.config.schema import CacheConfig, ClusterConfig, SchedulerConfig


@dataclass
class EngineArgs:
    model: str
    dtype: str | None
    device: str
    seed: int
    threads: int
    cache: CacheConfig
    scheduler: SchedulerConfig  # the colocated policy (prefill and decode workers use their role's section)

    @classmethod
    def from_cluster(cls, cfg: ClusterConfig) -> EngineArgs:
        return cls(model=cfg.model, dtype=cfg.dtype or None, device=cfg.device, seed=cfg.seed,
                   threads=cfg.threads, cache=cfg.cache, scheduler=cfg.colocated.policy())

    @classmethod
    def from_namespace(cls, a: argparse.Namespace) -> EngineArgs:
        """From `pdserve serve`'s parsed arguments (`a.cluster`, set by `worker.parse_settings`)."""
        return cls.from_cluster(a.cluster)

    def apply_threads(self) -> None:
        if self.threads > 0:
            import torch  # here, not at the top: `pdserve --help` and the sim need no torch

            torch.set_num_threads(self.threads)


def parse_settings(args: argparse.Namespace) -> None:
    """Resolve `pdserve serve`'s file and flags into `args.cluster` (validated) and its listen address
    (`args.host`, `args.port`, `args.api_key`), before anything heavy is imported."""
    from pdserve.config.flags import cluster_from_args, listen_from_args

    args.cluster = cluster_from_args(args, args.role)
    listen = listen_from_args(args)
    args.host, args.port, args.api_key = listen.host, listen.port, listen.api_key or None
