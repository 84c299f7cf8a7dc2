"""The KV bridge's host-side logic: buffer pool reuse, delivery in push order, and the CPU path
(gather on the caller's thread; the decode sink's writes land in the cache)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import torch

from pdserve.config.engine import CacheConfig
from pdserve.serve.kv_bridge import (
    BufferPool,
    CacheSink,
    KVPush,
    PendingLayer,
    Pusher,
    blocks_as_array,
    view_bytes,
)


def test_pool_reuses_the_smallest_buffer_that_fits() -> None:
    pool = BufferPool(pin=False)
    a = pool.get(100_000)
    assert a.numel() == 131072  # rounded up to a power of two
    b = pool.get(10)
    assert b.numel() == BufferPool.MIN_BYTES
    pool.put(a)
    pool.put(b)
    assert pool.get(5000) is b  # the smallest that fits, not the first
    assert pool.get(120_000) is a
    assert pool.allocated == 2
    assert pool.get(10).numel() == BufferPool.MIN_BYTES and pool.allocated == 3  # none free: a new one


def test_lent_buffer_returns_when_its_array_is_dropped() -> None:
    pool = BufferPool(pin=False)
    buf = pool.get(4096)
    arr = pool.lend(view_bytes(buf, torch.float32, (2, 8)).numpy(), buf)
    part = arr[:, 2:]  # a view keeps the buffer lent
    del arr
    gc.collect()
    assert pool.num_free == 0
    del part
    gc.collect()
    assert pool.num_free == 1 and pool.get(4096) is buf


class Ready:
    """A copy that completes when the test says so (stands in for a CUDA event)."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def synchronize(self) -> None:
        assert self.done.wait(10)


def test_layers_are_delivered_in_push_order_and_buffers_released() -> None:
    pusher = Pusher()
    got: list[int] = []
    released: list[int] = []
    readies = [Ready() for _ in range(4)]
    for i, r in enumerate(readies):
        pusher.submit(PendingLayer(r, lambda i=i: np.full(3, i), lambda a, dt: got.append(int(a[0])), "float32",
                               release=[lambda i=i: released.append(i)]))
    for r in reversed(readies):  # later copies finish first
        r.done.set()
    pusher.close()
    assert got == [0, 1, 2, 3] and released == [0, 1, 2, 3]


def test_a_failing_delivery_does_not_stop_the_next() -> None:
    pusher = Pusher()
    got: list[str] = []

    def bad(a: np.ndarray, dt: str) -> None:
        raise RuntimeError("sender closed")

    for deliver in (bad, lambda a, dt: got.append(dt)):
        r = Ready()
        r.done.set()
        pusher.submit(PendingLayer(r, lambda: np.zeros(1), deliver, "bfloat16"))
    pusher.close()
    assert got == ["bfloat16"]


def test_cpu_push_and_sink_round_trip(tiny_models: dict[str, Path]) -> None:
    from pdserve.engine.model_runner import ModelRunner

    runner = ModelRunner(str(tiny_models["qwen2"]), CacheConfig(block_size=4, num_blocks=8), dtype="bfloat16")
    for i, c in enumerate(runner.kv_caches):
        c.copy_(torch.randn(c.shape, generator=torch.Generator().manual_seed(i)))
    got: list[tuple[np.ndarray, str]] = []
    KVPush(runner).push(1, [5, 1], lambda a, dt: got.append((a, dt)))  # cpu: delivered before push returns
    (arr, dtype), = got
    want, want_dtype = blocks_as_array(runner, 1, [5, 1])
    assert dtype == want_dtype and np.array_equal(arr, want)
    CacheSink(runner).write(0, [2, 6], dtype, arr.shape, memoryview(arr.tobytes()))
    assert torch.equal(runner.kv_caches[0][:, [2, 6]], runner.kv_caches[1][:, [5, 1]])
