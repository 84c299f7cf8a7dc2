"""Shared memory for the shm transport, both ends: the sender's staging ring, the receiver's mappings.

The sender copies a chunk into its ring (`ShmRing.put`, or gathers cache blocks straight into it:
`ShmRing.gather`) and sends only the header over the socket; the
receiver maps the segment the header names (`Segments`) and copies the bytes out. Ring regions are
handed out in FIFO order and freed in the same order (the receiver acknowledges the chunks of one
connection in order), so the free space is always one or two runs at the ends.

Trust: a segment is created with mode 0600, so only processes of the same user (and root) can
map it. Any of them can write it while a chunk is in flight; with a cluster secret the receiver
copies the bytes out first and checks them against the keyed digest in the authenticated header
(see `protocol.payload_digest`), so such a write fails the request instead of injecting KV.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections import deque
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from pdserve.transfer.blocks import Blocks

SHM_PREFIX = "pdkv_"  # every segment pdserve creates is named so; a receiver maps no other
DEFAULT_RING_BYTES = 64 * 1024 * 1024


class ShmRing:
    """One segment, owned (created and unlinked) by the sending process."""

    def __init__(self, capacity: int = DEFAULT_RING_BYTES) -> None:
        name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
        self.shm = shared_memory.SharedMemory(name=name, create=True, size=capacity)
        self.capacity = capacity
        self._live: deque[tuple[int, int]] = deque()  # (offset, size), oldest first
        self._head = 0

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def empty(self) -> bool:
        return not self._live

    def alloc(self, n: int) -> int | None:
        """Offset of a free region of `n` bytes, or None until older regions are freed."""
        if n > self.capacity:
            return None
        if not self._live:
            off = 0
        else:
            oldest = self._live[0][0]
            if self._live[-1][0] >= oldest:  # not wrapped: free space at the end and at the start
                off = self._head if self.capacity - self._head >= n else (0 if oldest >= n else None)
            else:  # wrapped: free space between the newest and the oldest
                off = self._head if oldest - self._head >= n else None
            if off is None:
                return None
        self._live.append((off, n))
        self._head = off + n
        return off

    def free_oldest(self) -> None:
        self._live.popleft()

    def free_newest(self) -> None:
        """Give back the region just allocated (its chunk was not sent)."""
        self._live.pop()
        self._head = sum(self._live[-1]) if self._live else 0  # the head is the newest region's end

    def put(self, off: int, data: np.ndarray) -> None:
        """The one copy on the sending side."""
        dst = np.ndarray((data.nbytes,), dtype=np.uint8, buffer=self.shm.buf, offset=off)
        dst[:] = data.reshape(-1).view(np.uint8)
        del dst

    def gather(self, off: int, blocks: Blocks) -> memoryview:
        """The one copy on the sending side, from the cache blocks straight into the ring; returns
        the region (for the fault injector, which rewrites it)."""
        dst = np.ndarray(blocks.shape, dtype=blocks.dtype, buffer=self.shm.buf, offset=off)
        blocks.gather(dst)
        del dst
        return self.shm.buf[off:off + blocks.nbytes]

    def destroy(self) -> None:
        self._live.clear()
        try:
            self.shm.close()
        except BufferError:
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class Segments:
    """A receiver connection's mappings of its sender's segments (one live at a time)."""

    def __init__(self) -> None:
        self._segs: dict[str, shared_memory.SharedMemory] = {}
        self._scratch = bytearray()

    def view(self, name: str, offset: int, nbytes: int, sender_pid: int) -> memoryview:
        """The bytes in place; release the view before the next call (a mapping cannot close under it)."""
        seg = self._attach(name, sender_pid)
        if offset < 0 or nbytes < 0 or offset + nbytes > seg.size:
            raise ValueError("chunk lies outside its shared-memory segment")
        return seg.buf[offset: offset + nbytes]

    def copy(self, name: str, offset: int, nbytes: int, sender_pid: int) -> memoryview:
        """The bytes copied into a private buffer (reused by the next call), out of other writers' reach."""
        if len(self._scratch) < nbytes:
            self._scratch = bytearray(nbytes)
        out = memoryview(self._scratch)[:nbytes]
        src = self.view(name, offset, nbytes, sender_pid)
        try:
            out[:] = src
        finally:
            src.release()
        return out

    def close(self) -> None:
        for seg in self._segs.values():
            _close_segment(seg)
        self._segs.clear()

    def _attach(self, name: str, sender_pid: int) -> shared_memory.SharedMemory:
        """Map a segment once per name; a new name means the sender retired the old segment."""
        seg = self._segs.get(name)
        if seg is not None:
            return seg
        if not name.startswith(SHM_PREFIX) or "/" in name:
            raise ValueError(f"refusing shared-memory segment {name!r}")
        self.close()
        if sys.version_info >= (3, 13):
            seg = shared_memory.SharedMemory(name, track=False)
        else:
            seg = shared_memory.SharedMemory(name)
            if sender_pid != os.getpid():  # only the creating process may unlink it at exit
                resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
        self._segs[name] = seg
        return seg


def _close_segment(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.close()
    except BufferError:  # a sink kept a view of it; the mapping goes when that view does
        pass
