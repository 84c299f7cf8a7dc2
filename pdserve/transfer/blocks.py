"""A chunk's bytes laid straight over the cache blocks they belong in, and checked on the way in.

A chunk's payload is K then V of its blocks, `[2, n, block_size, ...]`. In a cache shaped
`[2, num_blocks, block_size, ...]` (C-contiguous) each run of consecutive block ids is one
contiguous region for K and one for V, so the payload is the concatenation of `2 * runs` writable
views (`block_views`). The receiver fills them from the socket (`recv_into_views`) or from a
shared-memory segment (`copy_into_views`), feeding a `Check` piece by piece while the bytes are
still in cache, so the payload is read once instead of three times (receive, verify, scatter).

Bytes land in the blocks before they are verified. That is safe because reserved blocks are fresh
and the request's own (`BlockManager.allocate_tokens`): a chunk that fails its check fails the
request, and the blocks of a FAILED request are freed without ever being read.
"""

from __future__ import annotations

import socket
import zlib
from asyncio import IncompleteReadError

import blake3
import numpy as np

PIECE = 1 << 20  # bytes received or copied before they are hashed: small enough to stay in L2/L3
MAX_VIEWS = 256  # beyond this many block runs a staging buffer and one scatter are cheaper


class Check:
    """The digest of bytes fed in order: keyed BLAKE3 under a cluster secret, else CRC32."""

    def __init__(self, key: bytes | None) -> None:
        self._b3 = blake3.blake3(key=key) if key is not None else None
        self._crc = 0

    def update(self, piece: memoryview) -> None:
        if self._b3 is not None:
            self._b3.update(piece)
        else:
            self._crc = zlib.crc32(piece, self._crc)

    def digest(self) -> bytes:
        return self._b3.digest() if self._b3 is not None else b""

    def crc(self) -> int:
        return self._crc


def runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first block, count) of each run of consecutive ids, in order."""
    out: list[tuple[int, int]] = []
    for b in block_ids:
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


def block_views(cache: np.ndarray, block_ids: list[int], write: bool = True) -> list[memoryview] | None:
    """Byte views of `cache`'s blocks in payload order (K runs, then V runs), or None when the cache is
    not a C-contiguous `[2, num_blocks, ...]` array (writable, for `write`) or the ids are too scattered."""
    if cache.ndim < 2 or cache.shape[0] != 2 or not cache.flags.c_contiguous:
        return None
    if write and not cache.flags.writeable:
        return None
    if any(not 0 <= b < cache.shape[1] for b in block_ids):
        raise ValueError(f"block ids outside the cache's {cache.shape[1]} blocks")
    rs = runs(block_ids)
    if 2 * len(rs) > MAX_VIEWS:
        return None
    return [memoryview(cache[kv, first:first + n]).cast("B") for kv in (0, 1) for first, n in rs]


def recv_into_views(sock: socket.socket, views: list[memoryview], check: Check) -> None:
    """Fill `views` in order from `sock`, feeding `check` each piece as it lands."""
    for view in views:
        got, n = 0, view.nbytes
        while got < n:
            piece = view[got:min(n, got + PIECE)]
            filled = 0
            while filled < piece.nbytes:
                k = sock.recv_into(piece[filled:])
                if k == 0:
                    raise IncompleteReadError(b"", n)
                filled += k
            check.update(piece)
            got += filled


def copy_into_views(src: memoryview, views: list[memoryview], check: Check) -> None:
    """Copy `src` (e.g. a shared-memory region) over `views`, feeding `check` from the copies, not
    from `src`: a process writing `src` meanwhile cannot make checked bytes differ from used ones."""
    off = 0
    for view in views:
        for i in range(0, view.nbytes, PIECE):
            dst = view[i:i + PIECE]
            # numpy, not a memoryview slice assignment: it copies with the GIL released
            np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src[off:off + dst.nbytes], np.uint8))
            off += dst.nbytes
            check.update(dst)


class Blocks:
    """Some blocks of a cache array `[2, num_blocks, ...]`, not yet gathered: what the prefill side
    hands the sender on CPU, so the gather runs on the link thread (not the engine's) and lands
    where the bytes go next (the shm ring, or the link's reused staging buffer), one copy in all.

    The caller must not write these blocks until the transfer ends (the prefill worker frees a
    request's blocks only then). `np.asarray` gathers, so code that wants an array still gets one.
    """

    __slots__ = ("cache", "block_ids")

    def __init__(self, cache: np.ndarray, block_ids: list[int]) -> None:
        if cache.ndim < 2 or cache.shape[0] != 2 or not cache.flags.c_contiguous:
            raise ValueError("Blocks needs a C-contiguous [2, num_blocks, ...] cache")
        self.cache, self.block_ids = cache, list(block_ids)

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, len(self.block_ids), *self.cache.shape[2:])

    @property
    def dtype(self) -> np.dtype:
        return self.cache.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.cache.itemsize

    def part(self, start: int, stop: int) -> Blocks:
        return Blocks(self.cache, self.block_ids[start:stop])

    def views(self) -> list[memoryview] | None:
        """The blocks' bytes in payload order, in place (None when too scattered)."""
        return block_views(self.cache, self.block_ids, write=False)

    def gather(self, out: np.ndarray | None = None) -> np.ndarray:
        """The KV as one `[2, n, ...]` array, into `out` (same shape and dtype) when given."""
        if out is None:
            out = np.empty(self.shape, self.cache.dtype)
        np.take(self.cache, self.block_ids, axis=1, out=out)
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        arr = self.gather()
        return arr if dtype is None else arr.astype(dtype)

    def tobytes(self) -> bytes:
        return self.gather().tobytes()
