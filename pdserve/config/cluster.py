"""The cluster of `pdserve up`: one YAML file (or flags), sections mirroring the seed design.

    model: demo
    prefill: {workers: 1, max_batch_tokens: 2048, max_num_seqs: 64, max_wait_ms: 50}
    decode: {workers: 1, max_batch_size: 64, max_num_seqs: 128}
    colocated: {workers: 0}
    transfer: {transport: tcp, bandwidth_gbps: 0, latency_ms: 0}
    router: {host: 127.0.0.1, port: 8000, disagg_threshold: 0}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pdserve.config.engine import ConfigError, TransferConfig, _check, from_dict


@dataclass
class PrefillSection:
    workers: int = 1
    max_batch_tokens: int = 2048
    max_num_seqs: int = 64
    max_wait_ms: float = 50.0
    target_utilization: float = 0.85
    length_buckets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.workers >= 0, "workers", "must be >= 0")
        _check(self.max_batch_tokens >= 1, "max_batch_tokens", "must be >= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(self.max_wait_ms >= 0, "max_wait_ms", "must be >= 0")
        _check(0 < self.target_utilization <= 1, "target_utilization", "must be in (0, 1]")


@dataclass
class DecodeSection:
    workers: int = 1
    max_batch_size: int = 64
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    adaptive_batch: bool = False
    tpot_target_ms: float = 0.0

    def __post_init__(self) -> None:
        _check(self.workers >= 0, "workers", "must be >= 0")
        _check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        _check(self.max_num_seqs >= self.max_batch_size, "max_num_seqs", "must be >= max_batch_size")
        _check(self.tpot_target_ms >= 0, "tpot_target_ms", "must be >= 0")


@dataclass
class ColocatedSection:
    workers: int = 0
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        _check(self.workers >= 0, "workers", "must be >= 0")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")


@dataclass
class RouterSection:
    host: str = "127.0.0.1"
    port: int = 8000
    disagg_threshold: int = 0  # prompts shorter than this are served without a prefill worker
    api_key: str = ""
    max_inflight: int = 512  # requests in the router at once; beyond them: 503 + Retry-After
    max_attempts: int = 4  # tries per request across worker failures
    first_token_timeout_s: float = 60.0
    token_timeout_s: float = 30.0
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "port", "must be in 0..65535")
        _check(self.disagg_threshold >= 0, "disagg_threshold", "must be >= 0")
        _check(self.max_inflight >= 1, "max_inflight", "must be >= 1")
        _check(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        for key in ("first_token_timeout_s", "token_timeout_s", "request_timeout_s"):
            _check(getattr(self, key) > 0, key, "must be > 0")


@dataclass
class ClusterConfig:
    model: str = "demo"
    dtype: str = ""
    device: str = "cpu"
    threads: int = 1  # torch threads per worker: workers share this machine's cores
    block_size: int = 16
    kv_cache_memory_gb: float = 0.5
    prefill: PrefillSection = field(default_factory=PrefillSection)
    decode: DecodeSection = field(default_factory=DecodeSection)
    colocated: ColocatedSection = field(default_factory=ColocatedSection)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterSection = field(default_factory=RouterSection)

    def __post_init__(self) -> None:
        _check(self.dtype in ("", "float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")
        _check(self.threads >= 0, "threads", "must be >= 0")
        _check(self.prefill.workers + self.decode.workers + self.colocated.workers > 0, "workers",
               "the cluster needs at least one worker")
        _check(self.prefill.workers == 0 or self.decode.workers > 0, "decode.workers",
               "prefill workers need at least one decode worker to send KV to")

    @property
    def num_workers(self) -> int:
        return self.prefill.workers + self.decode.workers + self.colocated.workers


SECTIONS = {"prefill": PrefillSection, "decode": DecodeSection, "colocated": ColocatedSection,
            "transfer": TransferConfig, "router": RouterSection}


def cluster_from_dict(data: dict[str, Any]) -> ClusterConfig:
    """Validate a cluster description; errors name the offending key, e.g. `decode.max_batch_size`."""
    if not isinstance(data, dict):
        raise ConfigError("the cluster file must be a mapping of sections")
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
        sections[name] = from_dict(cls, value, name)
    base = from_dict(ClusterConfig, top)
    return ClusterConfig(**{**{k: getattr(base, k) for k in top}, **sections})


def load_cluster_file(path: str | Path) -> ClusterConfig:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return cluster_from_dict(data)
