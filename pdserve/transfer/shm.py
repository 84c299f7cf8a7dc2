"""A shared-memory staging ring: the sender copies a chunk in, the receiver copies it out.

Regions are handed out in FIFO order and freed in the same order (the receiver acknowledges the
chunks of one connection in order), so the free space is always one or two runs at the ends.
"""

from __future__ import annotations

import os
import secrets
from collections import deque
from multiprocessing import shared_memory

import numpy as np

from pdserve.transfer.receiver import SHM_PREFIX

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

    def put(self, off: int, data: np.ndarray) -> None:
        """The one copy on the sending side."""
        dst = np.ndarray((data.nbytes,), dtype=np.uint8, buffer=self.shm.buf, offset=off)
        dst[:] = data.reshape(-1).view(np.uint8)
        del dst

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
