"""Between the engine's KV cache (torch) and the transfer plane (bytes).

On CPU the prefill side hands the sender the layer's blocks ungathered (`transfer.blocks.Blocks`):
the sender's link thread gathers them, straight into the shm ring or its reused tcp buffer, so the
engine thread copies nothing.
On CUDA the prefill side never synchronises the engine thread: when a layer's K/V are written, the
engine thread only enqueues work on a side stream (wait for the layer, gather the blocks, copy them
into a pinned host buffer) and records an event; a pusher thread waits for each event in push
order and hands the pinned buffer, as a numpy array, to the KV sender. The buffer returns to its
pool when the sender drops the array. The decode side copies incoming KV through pinned buffers
on a side stream and waits for that copy on the receiver's thread, not the engine's. On CPU the
decode side hands the receiver views of the reserved blocks, which it fills straight from the wire.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pdserve.engine.model_runner import ModelRunner
from pdserve.model.loader import TORCH_DTYPES
from pdserve.transfer.blocks import Blocks, block_views

log = logging.getLogger(__name__)

# Receives one layer's KV ([2, blocks, block_size, kv_heads, head_dim], or its blocks ungathered) and the dtype name.
Deliver = Callable[[np.ndarray | Blocks, str], None]


def _as_wire(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor as the numpy array the sender ships (numpy has no bfloat16: its raw 16-bit words)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def blocks_as_array(runner: ModelRunner, layer: int, block_ids: list[int]) -> tuple[np.ndarray, str]:
    """One layer's K and V of some blocks as a contiguous numpy array, and the dtype name to send."""
    return _as_wire(runner.read_blocks(layer, block_ids), runner.shape.dtype), runner.shape.dtype


class BufferPool:
    """Reusable host byte buffers (pinned when `pin`): the smallest free one that fits, else a new one.

    Sizes are rounded up to a power of two (at least 64 KiB) so buffers of similar layers are shared.
    Thread-safe: buffers are taken on one thread and given back on another.
    """

    MIN_BYTES = 64 * 1024

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers ever made (a test and a log line read it)

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            self.allocated += 1
        size = max(self.MIN_BYTES, 1 << max(0, nbytes - 1).bit_length())
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)

    def lend(self, arr: np.ndarray, buf: torch.Tensor) -> np.ndarray:
        """Give `buf` back once `arr` (a view of it) and every view of `arr` are gone."""
        weakref.finalize(arr, self.put, buf)
        return arr

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)


def view_bytes(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """Bytes [offset, ...) of a byte buffer as a tensor of `dtype` and `shape` (offset: a multiple of its size)."""
    n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return buf[offset : offset + n].view(dtype).view(shape)


@dataclass
class PendingLayer:
    ready: Any  # has .synchronize(): a CUDA event (a threading.Event-like in tests)
    wire: Callable[[], np.ndarray]  # the layer's array, valid once `ready` has fired
    deliver: Deliver
    dtype: str
    release: list[Callable[[], None]] = field(default_factory=list)  # after delivery: buffers back to pools
    keep: tuple[Any, ...] = ()  # device tensors the side stream still reads or writes until `ready`


class Pusher:
    """Delivers queued layers in the order they were pushed, each once its copy is ready (one thread)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[PendingLayer | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="kv-pusher", daemon=True)
        self._thread.start()

    def submit(self, item: PendingLayer) -> None:
        self._q.put(item)

    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            try:
                item.ready.synchronize()
                item.keep = ()
                item.deliver(item.wire(), item.dtype)
            except Exception:  # noqa: BLE001 - one failed layer must not stop the others' delivery
                log.exception("KV push of a layer failed")
            finally:
                for release in item.release:
                    release()

    def close(self) -> None:
        """Deliver what is queued, then stop."""
        self._q.put(None)
        self._thread.join(timeout=30)


class KVPush:
    """The prefill side's way out of the cache: `push(layer, block_ids, deliver)` from the engine thread.

    CPU: delivers the blocks ungathered at once (the sender gathers them). CUDA: enqueues a side-stream gather into a pinned buffer and
    returns; the pusher thread delivers once the copy is done (see the module docstring).
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cuda = runner.device.type == "cuda"
        self.pool = BufferPool(pin=self.cuda)
        self.pusher = Pusher() if self.cuda else None
        self.stream = torch.cuda.Stream(runner.device) if self.cuda else None

    def push(self, layer: int, block_ids: list[int], deliver: Deliver) -> None:
        if self.pusher is None:  # CPU: the blocks themselves; the sender's link thread gathers them
            dtype = self.runner.shape.dtype
            deliver(Blocks(_as_wire(self.runner.kv_caches[layer], dtype), block_ids), dtype)
            return
        self.pusher.submit(self._start_copy(layer, block_ids, deliver))  # pragma: no cover - needs CUDA

    def _start_copy(self, layer: int, block_ids: list[int], deliver: Deliver) -> PendingLayer:  # pragma: no cover
        """Engine thread, CUDA: launches only (no host wait): the copy runs behind the layer's kernels."""
        assert self.stream is not None
        cache = self.runner.kv_caches[layer]
        dtype = self.runner.shape.dtype
        shape = (2, len(block_ids), *cache.shape[2:])
        idx_buf = self.pool.get(8 * len(block_ids))
        idx_host = view_bytes(idx_buf, torch.long, (len(block_ids),))
        idx_host.numpy()[:] = block_ids
        out_buf = self.pool.get(int(np.prod(shape)) * cache.element_size())
        out_host = view_bytes(out_buf, cache.dtype, shape)
        layer_done = torch.cuda.Event()
        layer_done.record()  # on the compute stream, after this layer's KV writes
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(layer_done)
            idx = idx_host.to(self.runner.device, non_blocking=True)
            staged = cache.index_select(1, idx)
            out_host.copy_(staged, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        pool = self.pool

        def wire() -> np.ndarray:
            return pool.lend(_as_wire(out_host, dtype), out_buf)

        return PendingLayer(copied, wire, deliver, dtype, release=[lambda: pool.put(idx_buf)], keep=(idx, staged))

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()


class CacheSink:
    """The decode side's `KVSink`: copies verified chunks into reserved cache blocks.

    CUDA: through a pinned buffer and a side stream; the receiver thread waits for the copy (the
    sink must have copied `data` before returning), the engine thread never does.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.cuda = runner.device.type == "cuda"
        self.pool = BufferPool(pin=self.cuda)
        self.stream = torch.cuda.Stream(runner.device) if self.cuda else None

    def write(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        if dtype != self.runner.shape.dtype:
            raise ValueError(f"KV of dtype {dtype} sent to a {self.runner.shape.dtype} cache")
        if self.stream is not None:  # pragma: no cover - needs CUDA
            self._write_pinned(layer, block_ids, TORCH_DTYPES[dtype], shape, data)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only buffer is fine: write_blocks copies it
            raw = torch.frombuffer(data, dtype=torch.uint8)
        self.runner.write_blocks(layer, block_ids, raw.view(TORCH_DTYPES[dtype]).view(shape))

    def views(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...]) -> list[memoryview] | None:
        """CPU: writable byte views of the blocks (see `transfer.blocks`), so the receiver puts the
        bytes there itself and `write` is not called; CUDA: None (bytes go through `write`)."""
        if self.stream is not None:
            return None
        if dtype != self.runner.shape.dtype:
            raise ValueError(f"KV of dtype {dtype} sent to a {self.runner.shape.dtype} cache")
        cache = self.runner.kv_caches[layer]
        if tuple(shape[2:]) != tuple(cache.shape[2:]):
            raise ValueError(f"KV of shape {list(shape)} sent to a cache of blocks {list(cache.shape[2:])}")
        return block_views(_as_wire(cache, dtype), block_ids)

    def _write_pinned(self, layer: int, block_ids: list[int], dt: torch.dtype, shape: tuple[int, ...],
                      data: memoryview) -> None:  # pragma: no cover - needs CUDA
        assert self.stream is not None
        src = np.frombuffer(data, dtype=np.uint8)
        head = 8 * len(block_ids)  # the block ids first: the KV after them stays aligned
        buf = self.pool.get(head + src.nbytes)
        try:
            idx_host = view_bytes(buf, torch.long, (len(block_ids),))
            idx_host.numpy()[:] = block_ids
            buf.numpy()[head : head + src.nbytes] = src
            with torch.cuda.stream(self.stream):
                kv = view_bytes(buf, dt, shape, offset=head).to(self.runner.device, non_blocking=True)
                idx = idx_host.to(self.runner.device, non_blocking=True)
                self.runner.kv_caches[layer].index_copy_(1, idx, kv)
                done = torch.cuda.Event()
                done.record(self.stream)
            done.synchronize()
        finally:
            self.pool.put(buf)
