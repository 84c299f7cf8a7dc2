"""KV transfer messages and the states a transfer goes through.

One `KVChunk` frame carries K and V of one layer for a run of blocks of one request; its tensor
bytes travel as the frame payload (tcp) or in a shared-memory segment the header names (shm).
Without a cluster secret a chunk carries the CRC32 of its bytes (accidents, not adversaries). With
one, the header carries a keyed BLAKE3 digest of the bytes, wherever they travel (frame payload or
segment), and the frame's tag covers the header: one keyed hash per byte per side does both the
integrity and the authentication job.
The receiver answers every chunk with a `KVAck`, in order; the ack with `done=True` means every
layer of the request is written into the decode worker's blocks. `KVAbort` tells a receiver that
the sender gave a request up.
"""

from __future__ import annotations

import enum
import math
import zlib
from typing import Protocol

import blake3
import msgspec

# numpy has no bfloat16: the engine ships bf16 tensors as their raw 16-bit words and names the dtype.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint16": 2, "int8": 1, "uint8": 1,
               "float64": 8, "int32": 4, "int64": 8}


class KVPoll(enum.Enum):
    """Where one request's transfer stands, seen from either side."""

    BOOTSTRAPPING = "bootstrapping"  # known, nothing moved yet (sender: not connected; receiver: waiting)
    TRANSFERRING = "transferring"  # some chunks moved
    SUCCESS = "success"  # every layer written on the receiver and acknowledged
    FAILED = "failed"  # corrupt, aborted, dropped, cut or timed out; the KV must not be used


TERMINAL = (KVPoll.SUCCESS, KVPoll.FAILED)


class KVChunk(msgspec.Struct, tag="chunk", frozen=True):
    request_id: str
    layer: int
    num_layers: int
    block_ids: list[int]
    dtype: str
    shape: list[int]  # [2, len(block_ids), block_size, kv_heads, head_dim]: K and V
    nbytes: int
    checksum: int  # zlib.crc32 of the tensor bytes (no cluster secret); 0 when `digest` is set
    shm_name: str = ""  # shm: the segment holding the bytes; "" = they are the frame payload
    shm_offset: int = 0
    sender_pid: int = 0
    digest: bytes = b""  # payload_digest of the bytes, under a cluster secret (the header is authenticated)


class KVAbort(msgspec.Struct, tag="abort", frozen=True):
    request_id: str
    reason: str = ""


class KVAck(msgspec.Struct, tag="ack", frozen=True):
    request_id: str
    layer: int
    ok: bool
    done: bool = False
    error: str = ""


ToReceiver = KVChunk | KVAbort
_encoder = msgspec.msgpack.Encoder()
_to_receiver = msgspec.msgpack.Decoder(ToReceiver)
_to_sender = msgspec.msgpack.Decoder(KVAck)


def encode(msg: KVChunk | KVAbort | KVAck) -> bytes:
    return _encoder.encode(msg)


def decode_to_receiver(data: bytes) -> KVChunk | KVAbort:
    """Raises msgspec.DecodeError (a ValueError) on anything that is not a well-typed message."""
    return _to_receiver.decode(data)


def decode_ack(data: bytes) -> KVAck:
    return _to_sender.decode(data)


def checksum(data: memoryview | bytes) -> int:
    """Catches accidents (a torn or misplaced write), not an adversary."""
    return zlib.crc32(data)


# Below this a single thread hashes faster than BLAKE3's thread pool starts up.
_MULTITHREAD_FROM = 1 << 20


def payload_key(secret: bytes) -> bytes:
    """The key of payload digests, derived from the cluster secret so it never doubles as a frame tag."""
    return blake3.blake3(secret, derive_key_context="pdserve kv payload v2").digest()


def payload_digest(key: bytes, data: memoryview | bytes) -> bytes:
    """Keyed BLAKE3 of a chunk's bytes: only a holder of the cluster secret can make bytes that match.

    Large chunks are hashed on all cores (the GIL is released), so hashing keeps up with the copy.
    """
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    threads = blake3.blake3.AUTO if view.nbytes >= _MULTITHREAD_FROM else 1
    return blake3.blake3(view, key=key, max_threads=threads).digest()


def chunk_error(chunk: KVChunk, data_len: int) -> str:
    """Why a chunk's header is inconsistent with itself, or "" if it is sound."""
    if chunk.dtype not in DTYPE_BYTES:
        return f"unknown dtype {chunk.dtype!r}"
    if len(chunk.shape) < 2 or chunk.shape[0] != 2 or chunk.shape[1] != len(chunk.block_ids):
        return f"shape {chunk.shape} is not [2, {len(chunk.block_ids)}, ...]"
    if any(d < 0 for d in chunk.shape) or math.prod(chunk.shape) * DTYPE_BYTES[chunk.dtype] != chunk.nbytes:
        return f"shape {chunk.shape} of {chunk.dtype} does not make {chunk.nbytes} bytes"
    if data_len != chunk.nbytes:
        return f"{data_len} bytes arrived for a chunk of {chunk.nbytes}"
    if not 0 <= chunk.layer < chunk.num_layers:
        return f"layer {chunk.layer} out of range for {chunk.num_layers} layers"
    return ""


class KVSink(Protocol):
    """Where a receiver puts KV: the decode engine's cache. Called from the receiver's threads.

    `write` must copy `data` out before returning (the buffer is reused) and must not block for long.
    A sink may also offer `views(layer, block_ids, dtype, shape) -> list[memoryview] | None`:
    writable byte views of the blocks in payload order (`transfer.blocks.block_views`), which the
    receiver then fills itself, checking the bytes as they land, instead of calling `write`.
    """

    def write(self, layer: int, block_ids: list[int], dtype: str, shape: tuple[int, ...],
              data: memoryview) -> None: ...
