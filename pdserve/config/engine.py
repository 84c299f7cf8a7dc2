"""Typed, validated configuration for one instance: cache, scheduling policies, transfer.

Every class rejects bad values in `__post_init__` with a message naming the field; `from_dict`
rejects unknown keys. The YAML of `pdserve up` maps onto these classes section by section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key that is not accepted; the message names it."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str = "") -> T:
    """Build a config dataclass from a dict, naming any unknown key or wrong type."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    prefix = f"{section}." if section else ""
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(sorted(names))})")
    for key, value in data.items():
        default = names[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{prefix}{key}: expected true/false, got {value!r}")
        if isinstance(default, int | float) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{prefix}{key}: expected a number, got {value!r}")
        if isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{prefix}{key}: expected a string, got {value!r}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # 0: derive from kv_cache_memory_gb
    kv_cache_memory_gb: float = 0.5  # budget for KV tensors when num_blocks is 0
    enable_prefix_caching: bool = True
    eviction: str = "lru"  # lru | fifo

    def __post_init__(self) -> None:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", "must be a power of two <= 128")
        _check(self.num_blocks >= 0, "num_blocks", "must be >= 0")
        _check(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "must be > 0")
        _check(self.eviction in ("lru", "fifo"), "eviction", "must be 'lru' or 'fifo'")


@dataclass
class SchedulerConfig:
    """Colocated (and decode-role) continuous batching with chunked prefill (Sarathi-Serve)."""

    max_num_batched_tokens: int = 512  # token budget per step: decode tokens + prefill chunks
    max_num_seqs: int = 64  # sequences running at once
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")


@dataclass
class PrefillConfig:
    """Prefill-role batching: start a batch at a utilization target or after a maximum wait."""

    max_batch_tokens: int = 2048  # the worker's saturation token budget per batch
    target_utilization: float = 0.85  # start once queued tokens reach this share of the budget
    max_wait_ms: float = 50.0  # ...or once the oldest request has waited this long
    max_num_seqs: int = 64
    length_buckets: list[int] = field(default_factory=list)  # e.g. [512, 1024, 2048]; [] = one queue
    min_batch_scale: float = 0.25  # lowest share of the budget under decode back-pressure

    def __post_init__(self) -> None:
        _check(self.max_batch_tokens >= 1, "max_batch_tokens", "must be >= 1")
        _check(0 < self.target_utilization <= 1, "target_utilization", "must be in (0, 1]")
        _check(self.max_wait_ms >= 0, "max_wait_ms", "must be >= 0")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(list(self.length_buckets) == sorted(set(self.length_buckets)), "length_buckets",
               "must be strictly increasing")
        _check(all(isinstance(b, int) and b > 0 for b in self.length_buckets), "length_buckets",
               "must be positive integers")
        _check(0 < self.min_batch_scale <= 1, "min_batch_scale", "must be in (0, 1]")


@dataclass
class DecodeConfig:
    """Decode-role continuous batching."""

    max_batch_size: int = 64  # sequences decoded per step
    max_num_seqs: int = 128  # sequences admitted (running + reserved)
    max_num_batched_tokens: int = 512  # budget when the decode worker runs a prefill itself
    adaptive_batch: bool = False  # grow the batch with queue depth, bounded by tpot_target_ms
    tpot_target_ms: float = 0.0  # 0 = no bound
    min_batch_size: int = 8
    reservation_timeout_s: float = 30.0  # reserved blocks whose KV never arrives are freed

    def __post_init__(self) -> None:
        _check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        _check(self.max_num_seqs >= self.max_batch_size, "max_num_seqs", "must be >= max_batch_size")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", "must be >= 1")
        _check(self.tpot_target_ms >= 0, "tpot_target_ms", "must be >= 0")
        _check(1 <= self.min_batch_size <= self.max_batch_size, "min_batch_size",
               "must be in [1, max_batch_size]")
        _check(self.reservation_timeout_s > 0, "reservation_timeout_s", "must be > 0")


@dataclass
class TransferConfig:
    transport: str = "tcp"  # tcp | shm
    bandwidth_gbps: float = 0.0  # link emulation: 0 = as fast as the transport goes
    latency_ms: float = 0.0  # link emulation: added one-way latency per chunk
    max_frame_bytes: int = 256 * 1024 * 1024
    timeout_s: float = 30.0  # a transfer without progress this long fails (both sides free its blocks)
    # Fault injection, for tests and drills: corrupt a chunk after its checksum, or cut the
    # connection after sending a chunk, with these probabilities per chunk.
    fault_corrupt_prob: float = 0.0
    fault_cut_prob: float = 0.0

    def __post_init__(self) -> None:
        _check(self.transport in ("tcp", "shm"), "transport", "must be 'tcp' or 'shm'")
        _check(0 <= self.fault_corrupt_prob <= 1, "fault_corrupt_prob", "must be in [0, 1]")
        _check(0 <= self.fault_cut_prob <= 1, "fault_cut_prob", "must be in [0, 1]")
        _check(self.bandwidth_gbps >= 0, "bandwidth_gbps", "must be >= 0")
        _check(self.latency_ms >= 0, "latency_ms", "must be >= 0")
        _check(self.max_frame_bytes >= 4096, "max_frame_bytes", "must be >= 4096")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
