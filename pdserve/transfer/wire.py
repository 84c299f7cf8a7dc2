"""What one transfer connection carries, shared by both ends: the outgoing chunk and its plain
transmit step (sender), the reused receive buffer (receiver), and closing a socket for good."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.transfer.frames import encode_frame, write_frame_parts
from pdserve.transfer.protocol import KVChunk, encode
from pdserve.transfer.shm import ShmRing


@dataclass
class Outgoing:
    """One chunk ready to leave on a connection (tcp or shm)."""

    sock: socket.socket
    chunk: KVChunk
    payload: bytes | memoryview  # the frame payload: the bytes (tcp), or b"" when they are in the ring
    data: memoryview  # the bytes the checksum or digest was taken over
    ring: ShmRing | None  # shm: the ring holding the bytes at chunk.shm_offset
    secret: bytes | None


Transmit = Callable[[Outgoing], None]


def send_chunk(out: Outgoing) -> None:
    """The plain transmit step: one frame with the chunk header (and, for tcp, its bytes)."""
    write_frame_parts(out.sock, encode_frame(encode(out.chunk), out.payload, out.secret,
                                             split=bool(out.chunk.digest)))


class Scratch:
    """One connection's receive buffer, grown on demand and reused: a fresh bytearray per chunk
    costs a zero-fill and page faults over every byte, about as much as the receive itself."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def take(self, header: bytes, n: int) -> memoryview:
        if len(self._buf) < n:
            self._buf = bytearray(n)
        return memoryview(self._buf)[:n]


def shutdown(sock: socket.socket) -> None:
    """Shut both directions, so a thread blocked on the socket wakes; an already closed one is fine."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
