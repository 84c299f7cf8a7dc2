"""KV cache sizing: the arithmetic of `gpu_memory_utilization`, and the explicit sizes on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pdserve.config.model import CATALOG
from pdserve.config.schema import CacheConfig, ClusterConfig, ConfigError
from pdserve.engine.kv_sizing import GIB, blocks_for_bytes, kv_blocks_for, kv_cache_bytes, sized_from_memory

H200 = 140 * GIB


def test_budget_minus_weights_activations_reserve() -> None:
    kv = kv_cache_bytes(total=H200, free=125 * GIB, utilization=0.9, weights=15 * GIB, activation_peak=2 * GIB,
                        reserve=GIB // 2)
    assert kv == int(0.9 * H200) - 15 * GIB - 2 * GIB - GIB // 2
    assert blocks_for_bytes(kv, 16 * 131072) == kv // (16 * 131072)  # llama-3.1-8b bf16: 128 KiB per token


def test_nothing_left_names_the_settings() -> None:
    with pytest.raises(ValueError, match="raise gpu_memory_utilization or set kv_cache_memory_gb"):
        kv_cache_bytes(total=80 * GIB, free=70 * GIB, utilization=0.2, weights=15 * GIB, activation_peak=2 * GIB,
                       reserve=0)


def test_memory_held_by_another_process_is_not_taken() -> None:
    # A second worker on the same GPU asking for 0.9 of it while the first holds most of it.
    with pytest.raises(ValueError, match="lower gpu_memory_utilization"):
        kv_cache_bytes(total=H200, free=20 * GIB, utilization=0.9, weights=15 * GIB, activation_peak=GIB,
                       reserve=0)
    # Two workers at 0.45 each fit.
    kv = kv_cache_bytes(total=H200, free=int(0.5 * H200), utilization=0.45, weights=15 * GIB,
                        activation_peak=GIB, reserve=0)
    assert kv == int(0.45 * H200) - 16 * GIB


def test_which_size_applies() -> None:
    assert sized_from_memory(CacheConfig(), "cuda")
    assert sized_from_memory(CacheConfig(), "cuda:1")
    assert not sized_from_memory(CacheConfig(), "cpu")  # cpu: 0.5 GB as before
    assert not sized_from_memory(CacheConfig(kv_cache_memory_gb=12), "cuda")  # the override
    assert not sized_from_memory(CacheConfig(num_blocks=100), "cuda")
    assert blocks_for_bytes(10, 4096) == 4  # never fewer than a handful of blocks
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)
    assert ClusterConfig().cache.gpu_memory_utilization == 0.9


def test_cpu_sizes_are_the_settings() -> None:
    # kv_blocks_for reads only the runner's shape and device on this path.
    runner = SimpleNamespace(shape=CATALOG["demo"], device=torch.device("cpu"))
    per_block = 16 * CATALOG["demo"].kv_bytes_per_token()
    assert kv_blocks_for(runner, CacheConfig(num_blocks=7)) == 7
    assert kv_blocks_for(runner, CacheConfig()) == int(0.5 * GIB // per_block)  # as before this setting
    assert kv_blocks_for(runner, CacheConfig(kv_cache_memory_gb=0.25)) == int(0.25 * GIB // per_block)
