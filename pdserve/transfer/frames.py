"""Length-prefixed, optionally authenticated frames: the one wire format of every pdserve socket.

Layout of one frame::

    prefix  struct "!4sII": magic b"PDS1", header length, payload length   (12 bytes)
    tag     HMAC-SHA256(secret, prefix + header + payload), or 32 zero bytes without a secret
    header  `header length` bytes (msgspec-encoded by the caller)
    payload `payload length` raw bytes (tensor data; may be empty)

Readers check both lengths against `max_bytes` before reading the body, so a hostile or broken
peer cannot make them allocate more than that. A reader with a secret rejects a frame whose tag
does not match; a reader without one rejects a frame that carries a tag (a misconfigured cluster
should fail loudly, not half-work). End of stream raises `asyncio.IncompleteReadError` (an
`EOFError`) in both the asyncio and the blocking-socket versions; every other problem is `FrameError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import struct

MAX_FRAME_BYTES = 64 * 1024 * 1024
MAGIC = b"PDS1"
_PREFIX = struct.Struct("!4sII")
_TAG_LEN = 32
_NO_TAG = bytes(_TAG_LEN)
HEAD_LEN = _PREFIX.size + _TAG_LEN
# Below this, header and payload are joined into one buffer: one syscall beats saving a copy.
_JOIN_BELOW = 64 * 1024


class FrameError(Exception):
    """A frame that is malformed, too big, truncated or fails authentication."""


def _tag(secret: bytes, prefix: bytes, header: bytes, payload: bytes | memoryview) -> bytes:
    mac = hmac.new(secret, prefix, hashlib.sha256)
    mac.update(header)
    mac.update(payload)
    return mac.digest()


def encode_frame(
    header: bytes, payload: bytes | memoryview = b"", secret: bytes | None = None
) -> list[bytes | memoryview]:
    """The buffers of one frame, in order; the payload is not copied when it is large."""
    payload_len = memoryview(payload).nbytes
    prefix = _PREFIX.pack(MAGIC, len(header), payload_len)
    tag = _tag(secret, prefix, header, payload) if secret else _NO_TAG
    if payload_len < _JOIN_BELOW:
        return [b"".join((prefix, tag, header, payload))]
    flat = memoryview(payload)
    if flat.ndim != 1 or flat.format != "B":
        flat = flat.cast("B")  # sockets take any C-contiguous buffer, but byte views keep lengths honest
    return [prefix + tag + header, flat]


def _parse_head(head: bytes, max_bytes: int) -> tuple[int, int, bytes]:
    magic, header_len, payload_len = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not a pdserve frame")
    if header_len + payload_len > max_bytes:
        raise FrameError(f"frame of {header_len + payload_len} bytes exceeds the limit of {max_bytes}")
    return header_len, payload_len, head[_PREFIX.size:]


def _check_tag(secret: bytes | None, head: bytes, tag: bytes, body: memoryview, header_len: int) -> None:
    if secret:
        want = _tag(secret, head[: _PREFIX.size], body[:header_len], body[header_len:])
        if not hmac.compare_digest(want, tag):
            raise FrameError("frame authentication failed (wrong or missing cluster secret)")
    elif tag != _NO_TAG:
        raise FrameError("frame is authenticated but no cluster secret is configured here")


async def write_frame(
    writer: asyncio.StreamWriter, header: bytes, payload: bytes | memoryview = b"", secret: bytes | None = None
) -> None:
    """Write one frame and wait until the transport's buffer drains."""
    writer.writelines(encode_frame(header, payload, secret))
    await writer.drain()


async def read_frame(
    reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES, secret: bytes | None = None
) -> tuple[bytes, memoryview]:
    """Read one frame -> (header, payload). Raises FrameError, or IncompleteReadError at end of stream."""
    head = await reader.readexactly(HEAD_LEN)
    header_len, payload_len, tag = _parse_head(head, max_bytes)
    body = memoryview(await reader.readexactly(header_len + payload_len))
    _check_tag(secret, head, tag, body, header_len)
    return bytes(body[:header_len]), body[header_len:]


def write_frame_sync(
    sock: socket.socket, header: bytes, payload: bytes | memoryview = b"", secret: bytes | None = None
) -> None:
    """Blocking `write_frame` for threads that own a plain socket."""
    for part in encode_frame(header, payload, secret):
        sock.sendall(part)


def _recv_exactly(sock: socket.socket, buf: bytearray | memoryview, n: int, got_before: int = 0) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise asyncio.IncompleteReadError(bytes(view[:got]), n + got_before)
        got += k


def read_frame_sync(
    sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES, secret: bytes | None = None
) -> tuple[bytes, memoryview]:
    """Blocking `read_frame`; the payload is received straight into its own buffer (one copy)."""
    head = bytearray(HEAD_LEN)
    _recv_exactly(sock, head, HEAD_LEN)
    head_b = bytes(head)
    header_len, payload_len, tag = _parse_head(head_b, max_bytes)
    body = bytearray(header_len + payload_len)
    _recv_exactly(sock, body, len(body), HEAD_LEN)
    view = memoryview(body)
    _check_tag(secret, head_b, tag, view, header_len)
    return bytes(view[:header_len]), view[header_len:]
